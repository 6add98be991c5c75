/**
 * `ctx.llm`: a step's LLM calls, through the router and the run's journal.
 *
 * Each call is recorded under its step execution and its position within it (the first call a step
 * makes is position 0, and so on). When the step runs again (after a crash, or as a retry), a call
 * whose position holds a completed answer gets that answer back without a network call, so a
 * resumed run never pays twice for the same tokens. The request must be the same as the recorded
 * one: a step that asks for something else at the same position fails with
 * `LLM_JOURNAL_MISMATCH`, naming the step and the position, rather than silently reusing an answer
 * to a different question.
 */
import { createHash } from 'node:crypto';
import type { EngineDeps } from '../deps.ts';
import { ErrorCode, KeelError, serializeError } from '../errors.ts';
import type { HeldRun } from '../held-run.ts';
import type { LlmCallRecord } from '../store.ts';
import type { Attempt, RoutedResponse, Router, RouterTier } from './router.ts';
import type { LlmRequest, LlmResponse, LlmStreamEvent, LlmUsage, TierPrice } from './types.ts';
import { parseStored } from '../codec.ts';

/** `ctx.llm(request)`, and `ctx.llm.stream(request)` for text as it arrives. */
export type LlmCall = {
  (request: LlmRequest): Promise<LlmResponse>;
  stream(request: LlmRequest): AsyncIterable<LlmStreamEvent>;
};

/** Tiers already reported as misconfigured by this process: once is enough. */
const warnedTiers = new Set<string>();

/** Where the engine finds its router; built on first use. */
export type LlmSource = Router | (() => Router | Promise<Router>);

/** A step asked for a different LLM request than the one recorded at the same position. */
export class LlmJournalMismatchError extends KeelError {
  override name = 'LlmJournalMismatchError';
  readonly position: number;
  constructor(runId: string, step: string, position: number) {
    super(
      ErrorCode.llmJournalMismatch,
      `Step "${step}" of run ${runId} made a different request at LLM call ${position + 1} (position ${position}) than the one recorded when the step ran before.`,
      {
        runId,
        step,
        hint: 'A step must make the same LLM requests in the same order each time it runs: build prompts from the state and the input, not from the time or randomness. If the workflow changed on purpose, raise its version.',
      },
    );
    this.position = position;
  }
}

/** The sha256 of a request's canonical JSON (object keys sorted, undefined fields left out). */
export function requestHash(request: LlmRequest): string {
  return createHash('sha256').update(canonicalJson(request)).digest('hex');
}

function canonicalJson(value: unknown): string {
  if (value === null || typeof value !== 'object') return JSON.stringify(value) ?? 'null';
  if (Array.isArray(value)) return `[${value.map(canonicalJson).join(',')}]`;
  const entries = Object.entries(value as Record<string, unknown>)
    .filter(([, v]) => v !== undefined)
    .sort(([a], [b]) => (a < b ? -1 : a > b ? 1 : 0));
  return `{${entries.map(([k, v]) => `${JSON.stringify(k)}:${canonicalJson(v)}`).join(',')}}`;
}

/** US dollars for `usage` at `price` (cache tokens at the input price unless priced apart). */
export function costOf(usage: LlmUsage, price: TierPrice): number {
  const cents =
    usage.inputTokens * price.input +
    usage.outputTokens * price.output +
    (usage.cacheReadTokens ?? 0) * (price.cacheRead ?? price.input) +
    (usage.cacheWriteTokens ?? 0) * (price.cacheWrite ?? price.input);
  return cents / 1_000_000;
}

/** The cost of every attempt with a known usage; null when one of their tiers has no price. */
function costOfAttempts(attempts: Attempt[], tiers: readonly RouterTier[]): number | null {
  let total = 0;
  for (const attempt of attempts) {
    if (!attempt.usage) continue;
    const price = tiers.find((t) => t.name === attempt.tier)?.price;
    if (!price) return null;
    total += costOf(attempt.usage, price);
  }
  return total;
}

const withoutAttempts = ({ attempts: _attempts, ...response }: RoutedResponse): LlmResponse =>
  response;

export type JournalScope = {
  deps: EngineDeps;
  held: HeldRun;
  step: string;
  /** The step execution's index, as its step record will have it. */
  stepIndex: number;
  router: () => Promise<Router>;
};

/** Builds `ctx.llm` for one attempt of one step execution. */
export function journaledLlm(scope: JournalScope): LlmCall {
  const { deps, held, step, stepIndex } = scope;
  let next = 0;
  // A workflow may refuse the offline tier: with every real tier down, its runs wait instead.
  const callOptions = held.workflow.options.degraded === false ? { degraded: false } : {};

  /** The recorded answer at `position`, if the step got one before. */
  const recorded = async (position: number, hash: string) => {
    const row = await deps.store.getLlmCall(held.id, stepIndex, position);
    if (!row) return { row };
    if (row.status !== 'completed') return { row };
    if (row.requestHash !== hash) throw new LlmJournalMismatchError(held.id, step, position);
    await deps.store.markLlmReplayed(held.id, stepIndex, position, deps.clock.now());
    const response = parseStored(row.response ?? 'null') as LlmResponse;
    deps.emit({
      type: 'llm-called',
      runId: held.id,
      step,
      position,
      tier: response.tier,
      replayed: true,
    });
    return { row, response };
  };

  const base = (position: number, hash: string, streamed: boolean, prior?: LlmCallRecord) => {
    const now = deps.clock.now();
    return {
      runId: held.id,
      stepIndex,
      position,
      step,
      requestHash: hash,
      streamed,
      replays: 0,
      createdAt: prior?.createdAt ?? now,
      updatedAt: now,
    };
  };

  const priorAttempts = (prior: LlmCallRecord | undefined): Attempt[] =>
    prior ? (parseStored(prior.attempts) as Attempt[]) : [];

  const recordAnswer = async (
    position: number,
    hash: string,
    streamed: boolean,
    routed: RoutedResponse,
    prior: LlmCallRecord | undefined,
    started: number,
  ) => {
    const router = await scope.router();
    const attempts = [...priorAttempts(prior), ...routed.attempts];
    const response = withoutAttempts(routed);
    await deps.store.recordLlmCall(held.epoch, {
      ...base(position, hash, streamed, prior),
      status: 'completed',
      response: JSON.stringify(response),
      error: null,
      tier: response.tier,
      provider: response.provider,
      model: response.model,
      degraded: response.degraded,
      attempts: JSON.stringify(attempts),
      inputTokens: response.usage.inputTokens,
      outputTokens: response.usage.outputTokens,
      cacheReadTokens: response.usage.cacheReadTokens ?? 0,
      cacheWriteTokens: response.usage.cacheWriteTokens ?? 0,
      costUsd: costOfAttempts(attempts, router.tiers),
      // The whole call as the step waited for it: retries, waits and failovers included.
      latencyMs: Math.round(performance.now() - started),
    });
    deps.emit({
      type: 'llm-called',
      runId: held.id,
      step,
      position,
      tier: response.tier,
      replayed: false,
    });
    warnAbout(attempts, response, position);
    return response;
  };

  /** Says what a user running unattended must know: refused keys, and answers not generated. */
  const warnAbout = (attempts: Attempt[], response?: LlmResponse, position?: number) => {
    for (const a of attempts) {
      if ((a.class === 'auth' || a.class === 'not_found') && !warnedTiers.has(a.tier)) {
        warnedTiers.add(a.tier);
        deps.logger.warn('llm tier misconfigured; skipped', {
          runId: held.id,
          step,
          tier: a.tier,
          reason: a.reason ?? a.class,
        });
      }
    }
    if (response?.degraded) {
      deps.logger.warn('llm call answered by the offline degraded tier (no model answered)', {
        runId: held.id,
        step,
        position,
      });
    }
  };

  const recordFailure = async (
    position: number,
    hash: string,
    streamed: boolean,
    error: unknown,
    prior: LlmCallRecord | undefined,
  ) => {
    if (held.signal.aborted) return;
    const router = await scope.router();
    const own = (error as { attempts?: unknown }).attempts;
    const attempts = [...priorAttempts(prior), ...(Array.isArray(own) ? (own as Attempt[]) : [])];
    warnAbout(Array.isArray(own) ? (own as Attempt[]) : []);
    try {
      await deps.store.recordLlmCall(held.epoch, {
        ...base(position, hash, streamed, prior),
        status: 'failed',
        response: null,
        error: JSON.stringify(serializeError(error)),
        tier: null,
        provider: null,
        model: null,
        degraded: false,
        attempts: JSON.stringify(attempts),
        inputTokens: 0,
        outputTokens: 0,
        cacheReadTokens: 0,
        cacheWriteTokens: 0,
        costUsd: costOfAttempts(attempts, router.tiers),
        latencyMs: 0,
      });
    } catch {
      // The call's own error is what the step should see.
    }
  };

  const call = async (request: LlmRequest): Promise<LlmResponse> => {
    const position = next++;
    const hash = requestHash(request);
    const { row, response } = await recorded(position, hash);
    if (response) return response;
    const router = await scope.router();
    const started = performance.now();
    let routed: RoutedResponse;
    try {
      routed = await router.complete(request, held.signal, callOptions);
    } catch (error) {
      await recordFailure(position, hash, false, error, row);
      throw error;
    }
    return recordAnswer(position, hash, false, routed, row, started);
  };

  const stream = (request: LlmRequest): AsyncIterable<LlmStreamEvent> => {
    // The position is taken when the stream is asked for, not when it is first read.
    const position = next++;
    const hash = requestHash(request);
    return {
      async *[Symbol.asyncIterator]() {
        const { row, response } = await recorded(position, hash);
        if (response) {
          if (response.text !== '') yield { type: 'text', text: response.text };
          yield { type: 'done', response };
          return;
        }
        const router = await scope.router();
        const started = performance.now();
        try {
          for await (const event of router.stream(request, held.signal, callOptions)) {
            if (event.type !== 'done') {
              yield event;
              continue;
            }
            const answer = await recordAnswer(position, hash, true, event.response, row, started);
            yield { type: 'done', response: answer };
          }
        } catch (error) {
          await recordFailure(position, hash, true, error, row);
          throw error;
        }
      },
    };
  };

  return Object.assign(call, { stream });
}

/** Resolves an {@link LlmSource} once, on first use. */
export function lazyRouter(source: LlmSource | undefined): () => Promise<Router> {
  let built: Promise<Router> | undefined;
  return () => {
    built ??= (async () => {
      if (source === undefined) {
        throw new KeelError(ErrorCode.definition, 'No LLM tiers are configured for this engine.', {
          hint: 'Open the engine with openEngine() (tiers from keel.config.json or ANTHROPIC_API_KEY / OPENAI_API_KEY), or pass `llm` to the Engine.',
        });
      }
      return typeof source === 'function' ? source() : source;
    })();
    // A failed build (say, a bad configuration) is reported again on the next call, not cached.
    built.catch(() => (built = undefined));
    return built;
  };
}
