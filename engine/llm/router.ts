/**
 * The LLM router: one call tried over an ordered list of tiers (providers), with one attempt budget
 * for the whole call, per-class retry policy, a quota cooldown, a circuit breaker per tier, timeouts
 * for silent streams and optional hedging. Pure engine policy: providers are plain objects, time
 * comes from a {@link Clock}, and tier state lives behind a {@link TierStateStore}.
 */
import { ErrorCode, KeelError } from '../errors.ts';
import { backoffMs as jitterBackoff, type Clock } from '../time.ts';
import { classifyFailure } from './classify.ts';
import { DEGRADED_PROVIDER } from './degraded.ts';
import {
  initialTierState,
  memoryTierStates,
  type TierState,
  type TierStateStore,
} from './tier-state.ts';
import type {
  Classified,
  FailureClass,
  LlmProvider,
  LlmRequest,
  LlmResponse,
  LlmStreamEvent,
  LlmUsage,
  ProviderFailure,
  TierPrice,
} from './types.ts';

export type { LlmProvider };

export type RouterTier = {
  name: string;
  provider: LlmProvider;
  /** The tier's context window in tokens; used to pick a larger tier on `context_length`. */
  contextWindow?: number;
  /** The longest provider-asked wait this tier is retried after; the router's default if absent. */
  maxRetryAfterMs?: number;
  /** What its tokens cost, for the journal's cost figures. */
  price?: TierPrice;
  /** The offline tier: its answers are marked degraded. */
  degraded?: boolean;
  /**
   * At most this many requests in flight to this tier from this router at once (a recovering
   * provider is not hit by a whole backlog at the same instant); the router's default if absent.
   */
  maxInFlight?: number;
};

/** One request sent to a tier, and how it ended. */
export type Attempt = {
  tier: string;
  /** How it failed; absent when it answered (or was cancelled). */
  class?: FailureClass;
  status?: number;
  /** A short reason for a failure (never a key or a prompt). */
  reason?: string;
  /** The wait slept after this attempt, before the next one. */
  waitMs?: number;
  latencyMs?: number;
  /** Tokens it used, where known (an answer's usage, or what a stream reported before it ended). */
  usage?: LlmUsage;
  /** A hedged attempt that lost the race and was cancelled. */
  cancelled?: true;
  /** Started as a hedge, while an earlier attempt was still waiting for its first token. */
  hedge?: true;
};

export type BreakerState = {
  state: 'closed' | 'open' | 'half_open';
  failures: number;
  openUntil: number;
};

export type RouterTimeouts = {
  /**
   * Streams: longest wait for the first token (or the whole answer when there is no text).
   * Default 120 s.
   */
  firstTokenMs?: number;
  /** Streams: longest silence between two chunks once the answer has started. Default 60 s. */
  idleMs?: number;
  /**
   * Whole call per attempt. Default: none for streams (a stream that keeps producing is never
   * cut), 10 minutes for plain calls, whose bodies give no sign of life until they are complete.
   */
  totalMs?: number;
};

export type RouterOptions = {
  tiers: RouterTier[];
  /** Total requests for one call, across all tiers (hedges included). */
  budget?: number;
  clock: Clock;
  random?: () => number;
  maxRetryAfterMs?: number;
  backoffMs?: number;
  maxBackoffMs?: number;
  breaker?: { failureThreshold?: number; cooldownMs?: number };
  quotaCooldownMs?: number;
  /**
   * How many times one call retries a tier that answers "rate limited" or "overloaded" before it
   * moves on to the next tier (default 2).
   */
  sameTierRetries?: number;
  /** Default of {@link RouterTier.maxInFlight}: unlimited when absent. */
  maxInFlight?: number;
  /** How long this router skips a tier that refused its key or lacks the model (10 minutes). */
  misconfiguredSkipMs?: number;
  timeouts?: RouterTimeouts;
  /**
   * Start the same request on the next available tier when no first token has arrived after this
   * long; the first to answer wins and the other is cancelled. Off when absent.
   */
  hedgeAfterMs?: number;
  /**
   * Send plain calls as streams where the provider supports it (default true), so that the
   * silence timeouts apply to them; false sends them as plain requests, limited by `totalMs` only.
   */
  streamPlainCalls?: boolean;
  /** Where breakers and cooldowns are kept; in memory when absent. */
  states?: TierStateStore;
  /** Timers for the timeouts and the hedge delay (wall time, even under a fake clock). */
  timer?: (ms: number, fire: () => void) => () => void;
};

export type RoutedResponse = LlmResponse & { attempts: Attempt[] };

/** Per call: `degraded: false` leaves the offline tier out (the call fails, or parks, instead). */
export type CallOptions = { degraded?: boolean };

export type RoutedStreamEvent =
  Exclude<LlmStreamEvent, { type: 'done' }> | { type: 'done'; response: RoutedResponse };

export type Router = {
  readonly tiers: readonly RouterTier[];
  complete(
    request: LlmRequest,
    signal?: AbortSignal,
    options?: CallOptions,
  ): Promise<RoutedResponse>;
  /**
   * Text as it arrives. A failure before the first token moves on transparently; a failure after
   * it yields a `restart` event before the next tier's answer, which starts from its beginning.
   */
  stream(
    request: LlmRequest,
    signal?: AbortSignal,
    options?: CallOptions,
  ): AsyncIterable<RoutedStreamEvent>;
  /** Breakers as this router last saw them. */
  breakers(): Record<string, BreakerState>;
  /** Tiers found misconfigured (`auth`, `not_found`), in tier order. */
  misconfigured(): string[];
  /** Tiers down after a `quota` failure, with the time they may be used again. */
  downUntil(): Record<string, number>;
};

/** No tier could answer within the budget; worth trying again later. */
export class LlmUnavailableError extends KeelError {
  override name = 'LlmUnavailableError';
  readonly attempts: Attempt[];
  /** The largest wait a provider asked for during the call, if any. */
  readonly retryAfterMs: number | undefined;
  /**
   * When every tier was cooling down (breaker open, quota spent): the earliest time one of them may
   * be tried again.
   */
  readonly availableAt: number | undefined;

  constructor(
    message: string,
    attempts: Attempt[],
    retryAfterMs: number | undefined,
    availableAt?: number,
  ) {
    super(ErrorCode.llmUnavailable, message, {
      hint: 'Every tier failed or is cooling down; the step is retried by its retry policy. `keel doctor` checks each tier.',
    });
    this.attempts = attempts;
    this.retryAfterMs = retryAfterMs;
    this.availableAt = availableAt;
  }
}

/** The request itself cannot be answered (`bad_request`, or too long for every tier). */
export class LlmRejectedError extends KeelError {
  override name = 'LlmRejectedError';
  readonly attempts: Attempt[];
  readonly failureClass: FailureClass;

  constructor(message: string, attempts: Attempt[], failureClass: FailureClass) {
    super(ErrorCode.llmRejected, message, {
      hint:
        failureClass === 'context_length'
          ? 'Shorten the prompt, or configure a tier with a larger contextWindow.'
          : failureClass === 'auth' || failureClass === 'not_found'
            ? 'Every tier refused its key or does not have the model: check the keys and models (`keel doctor`).'
            : 'The request is wrong for the provider; fix it (retrying will not help).',
    });
    this.attempts = attempts;
    this.failureClass = failureClass;
  }
}

const BREAKER_CLASSES: ReadonlySet<FailureClass> = new Set<FailureClass>([
  'server',
  'network',
  'timeout',
  'overloaded',
  'truncated',
]);

/** The offline tier, marked as such or recognised by its provider. */
const isDegraded = (tier: RouterTier): boolean =>
  tier.degraded === true || tier.provider.name === DEGRADED_PROVIDER;

const DEFAULT_FIRST_TOKEN_MS = 120_000;
const DEFAULT_IDLE_MS = 60_000;
const DEFAULT_COMPLETE_TOTAL_MS = 600_000;

const isProviderFailure = (value: unknown): value is ProviderFailure =>
  typeof value === 'object' &&
  value !== null &&
  typeof (value as { message?: unknown }).message === 'string';

/** The failure an error carries, or a network failure for anything that is not a provider's. */
function failureOf(err: unknown): ProviderFailure {
  if (typeof err === 'object' && err !== null && 'failure' in err) {
    const failure = err.failure;
    if (isProviderFailure(failure)) return failure;
  }
  return { kind: 'network', message: err instanceof Error ? err.message : String(err) };
}

/** A failure the router itself decided (a timeout), thrown like a provider's. */
class RouterFailure extends Error {
  readonly failure: ProviderFailure;
  constructor(failure: ProviderFailure) {
    super(failure.message);
    this.failure = failure;
  }
}

const realTimer = (ms: number, fire: () => void) => {
  const handle = setTimeout(fire, ms);
  return () => clearTimeout(handle);
};

/** One request in flight on one tier. */
type Live = {
  tier: RouterTier;
  hedge: boolean;
  started: number;
  /** Settles when the first token (or the answer) arrives; rejects if the attempt fails first. */
  first: Promise<void>;
  result: Promise<LlmResponse>;
  /** Text received so far; forwarded once this attempt is chosen. */
  texts: string[];
  /** Set when this attempt's text goes to the caller. */
  forward: ((text: string) => void) | undefined;
  /** Characters forwarded to the caller. */
  delivered: number;
  usage: Partial<LlmUsage>;
  cancel(): void;
};

export function createRouter(options: RouterOptions): Router {
  const {
    tiers,
    budget = 4,
    clock,
    random = Math.random,
    maxRetryAfterMs = 60_000,
    backoffMs = 250,
    maxBackoffMs = 10_000,
    quotaCooldownMs = 3_600_000,
    hedgeAfterMs,
    sameTierRetries = 2,
    misconfiguredSkipMs = 600_000,
    states = memoryTierStates(),
    timer = realTimer,
  } = options;
  const failureThreshold = options.breaker?.failureThreshold ?? 3;
  const cooldownMs = options.breaker?.cooldownMs ?? 30_000;
  const firstTokenMs = options.timeouts?.firstTokenMs ?? DEFAULT_FIRST_TOKEN_MS;
  const idleMs = options.timeouts?.idleMs ?? DEFAULT_IDLE_MS;
  const totalMs = options.timeouts?.totalMs;
  if (tiers.length === 0) throw new Error('createRouter needs at least one tier');
  const names = new Set(tiers.map((t) => t.name));
  if (names.size !== tiers.length) throw new Error('createRouter: tier names must be unique');

  /** The last state seen of each tier, for the synchronous views. */
  const seen = new Map<string, TierState>();
  const read = async (tier: RouterTier): Promise<TierState> => {
    const state = (await states.readTierState(tier.name)) ?? initialTierState(tier.name);
    seen.set(tier.name, state);
    return state;
  };
  const update = async (tier: RouterTier, change: (s: TierState) => TierState) => {
    const state = await states.updateTierState(tier.name, change);
    seen.set(tier.name, state);
    return state;
  };

  /**
   * Tiers that refused their key or lack the model, skipped by this router until then: a key is
   * fixed by restarting with another, so asking again on every call would only add a round trip.
   * Not shared through the tier state, so that a process started with the right key is not misled.
   */
  const refusedUntil = new Map<string, number>();

  /** Whether a tier may take a request now (an expired open breaker admits one probe). */
  const available = async (tier: RouterTier): Promise<boolean> => {
    const now = clock.now();
    if ((refusedUntil.get(tier.name) ?? 0) > now) return false;
    const s = await read(tier);
    if (s.downUntil > now) return false;
    if (s.breaker === 'open' && now < s.openUntil) return false;
    if (s.breaker !== 'closed' && s.probeUntil > now) return false;
    return true;
  };

  /** Takes the half-open probe slot for this call; false when another caller holds it. */
  const claimProbe = async (tier: RouterTier, token: string): Promise<boolean> => {
    // `available` has just read the state: a closed breaker needs no write.
    if ((seen.get(tier.name)?.breaker ?? 'closed') === 'closed') return true;
    const now = clock.now();
    const s = await update(tier, (cur) => {
      if (cur.breaker === 'closed') return cur;
      if (cur.breaker === 'open' && now < cur.openUntil) return cur;
      if (cur.probeUntil > now && cur.probeOwner !== token) return cur;
      return {
        ...cur,
        breaker: 'half_open',
        probeOwner: token,
        probeUntil: now + cooldownMs,
        updatedAt: now,
      };
    });
    return s.breaker === 'closed' || s.probeOwner === token;
  };

  const succeeded = async (tier: RouterTier) => {
    const s = seen.get(tier.name);
    if (s && s.breaker === 'closed' && s.failures === 0 && s.misconfigured === null) return;
    const now = clock.now();
    await update(tier, (cur) => ({
      ...cur,
      breaker: 'closed',
      failures: 0,
      openUntil: 0,
      probeOwner: null,
      probeUntil: 0,
      misconfigured: null,
      updatedAt: now,
    }));
  };

  const failed = async (tier: RouterTier, classified: Classified, token: string) => {
    const cls = classified.class;
    const now = clock.now();
    await update(tier, (cur) => {
      const next = { ...cur, updatedAt: now };
      const wasProbe = cur.breaker === 'half_open' && cur.probeOwner === token;
      if (wasProbe) {
        next.probeOwner = null;
        next.probeUntil = 0;
      }
      if (BREAKER_CLASSES.has(cls)) next.failures = cur.failures + 1;
      if (wasProbe || (BREAKER_CLASSES.has(cls) && next.failures >= failureThreshold)) {
        next.breaker = 'open';
        next.openUntil = now + cooldownMs;
      }
      if (cls === 'quota') next.downUntil = now + quotaCooldownMs;
      // The offline tier refusing a request it cannot serve (JSON, tools) is not a misconfiguration.
      if ((cls === 'auth' || cls === 'not_found') && !isDegraded(tier)) {
        next.misconfigured = classified.reason;
      }
      return next;
    });
  };

  /** Requests in flight per tier, and the calls waiting for a slot. */
  const inFlight = new Map<string, number>();
  const slotWaiters = new Map<string, (() => void)[]>();
  const limitOf = (tier: RouterTier) => tier.maxInFlight ?? options.maxInFlight ?? Infinity;
  const acquire = async (tier: RouterTier, signal: AbortSignal | undefined): Promise<void> => {
    while ((inFlight.get(tier.name) ?? 0) >= limitOf(tier)) {
      signal?.throwIfAborted();
      await new Promise<void>((resolve) => {
        const list = slotWaiters.get(tier.name) ?? [];
        list.push(resolve);
        slotWaiters.set(tier.name, list);
      });
    }
    inFlight.set(tier.name, (inFlight.get(tier.name) ?? 0) + 1);
  };
  const releaseSlot = (tier: RouterTier) => {
    inFlight.set(tier.name, (inFlight.get(tier.name) ?? 1) - 1);
    slotWaiters.get(tier.name)?.shift()?.();
  };

  /** Starts one request on one tier, with its timeouts. */
  function launch(
    tier: RouterTier,
    request: LlmRequest,
    streaming: boolean,
    outer: AbortSignal | undefined,
    hedge: boolean,
  ): Live {
    const controller = new AbortController();
    const relay = () => controller.abort(outer?.reason);
    outer?.addEventListener('abort', relay, { once: true });
    let expired: ProviderFailure | undefined;
    let cancelled = false;
    const cancels: (() => void)[] = [];
    const expire = (message: string) => {
      expired = { kind: 'timeout', message };
      controller.abort(new RouterFailure(expired));
    };
    const arm = (ms: number | undefined, message: string): (() => void) => {
      if (ms === undefined || !Number.isFinite(ms)) return () => {};
      const cancel = timer(ms, () => expire(message));
      cancels.push(cancel);
      return cancel;
    };
    let firstSeen!: () => void;
    let firstFailed!: (error: unknown) => void;
    const first = new Promise<void>((resolve, reject) => {
      firstSeen = resolve;
      firstFailed = reject;
    });
    first.catch(() => {});
    const live: Live = {
      tier,
      hedge,
      started: performance.now(),
      first,
      result: Promise.resolve() as unknown as Promise<LlmResponse>,
      texts: [],
      forward: undefined,
      delivered: 0,
      usage: {},
      cancel: () => {
        cancelled = true;
        controller.abort(new Error('cancelled: another tier answered first'));
      },
    };
    const provider = tier.provider;
    const run = async (): Promise<LlmResponse> => {
      if (limitOf(tier) !== Infinity) {
        await acquire(tier, controller.signal);
        try {
          return await attempt();
        } finally {
          releaseSlot(tier);
        }
      }
      return attempt();
    };
    const attempt = async (): Promise<LlmResponse> => {
      arm(
        totalMs ?? (streaming && provider.stream ? undefined : DEFAULT_COMPLETE_TOTAL_MS),
        `no complete answer within ${totalMs ?? DEFAULT_COMPLETE_TOTAL_MS} ms`,
      );
      if (!provider.stream || !streaming) {
        const response = await provider.complete(request, controller.signal);
        firstSeen();
        return response;
      }
      let silence = arm(firstTokenMs, `no first token within ${firstTokenMs} ms`);
      let started = false;
      for await (const event of provider.stream(request, controller.signal)) {
        if (event.type === 'usage') {
          Object.assign(live.usage, event.usage);
          // Usage is not a token: before the first one, the first-token timer keeps running.
          if (!started) continue;
        } else if (event.type === 'text') {
          if (event.text === '') continue;
          if (!started) {
            started = true;
            firstSeen();
          }
          if (live.forward) {
            live.delivered += event.text.length;
            live.forward(event.text);
          } else {
            live.texts.push(event.text);
          }
        } else {
          firstSeen();
          return event.response;
        }
        silence();
        silence = arm(idleMs, `stream silent for ${idleMs} ms`);
      }
      throw new RouterFailure({ kind: 'truncated', message: 'stream ended without its answer' });
    };
    live.result = run()
      .catch((error: unknown) => {
        if (expired) throw new RouterFailure(expired);
        if (cancelled) throw new Error('cancelled');
        if (outer?.aborted) throw outer.reason;
        throw error;
      })
      .finally(() => {
        for (const cancel of cancels) cancel();
        outer?.removeEventListener('abort', relay);
      });
    live.result.then(
      () => firstSeen(),
      (error: unknown) => firstFailed(error),
    );
    return live;
  }

  /** When every tier is cooling down, the earliest moment one may be tried; else undefined. */
  const availableAt = (): number | undefined => {
    const now = clock.now();
    let earliest = Infinity;
    for (const tier of tiers) {
      const s = seen.get(tier.name) ?? initialTierState(tier.name);
      const until = Math.max(s.downUntil, s.breaker === 'open' ? s.openUntil : 0);
      if (until <= now) return undefined;
      earliest = Math.min(earliest, until);
    }
    return earliest;
  };

  /** Routes one call; `emit` receives text and restart events when streaming. */
  async function route(
    request: LlmRequest,
    signal: AbortSignal | undefined,
    emit: ((event: Exclude<LlmStreamEvent, { type: 'done' }>) => void) | undefined,
    callOptions: CallOptions = {},
  ): Promise<RoutedResponse> {
    // Plain calls stream too, where the provider can: then the connect, first-token and idle
    // timeouts guard them as well, instead of a body that gives no sign of life until complete.
    const streaming = emit !== undefined || options.streamPlainCalls !== false;
    const token = `${clock.now()}:${random().toString(36).slice(2)}`;
    const attempts: Attempt[] = [];
    /** Tiers this call will not use again. */
    const excluded = new Set<string>(
      callOptions.degraded === false ? tiers.filter(isDegraded).map((t) => t.name) : [],
    );
    let launched = 0;
    let cursor = 0;
    let pendingWait = 0;
    let largestRetryAfter: number | undefined;
    let last: Classified | undefined;
    /** Set after text was delivered and the attempt failed: the next answer starts over. */
    let restartReason: string | undefined;
    /** The tier last found rate limited or overloaded, and how many times in a row. */
    let busyTier: string | undefined;
    let busyRetries = 0;

    const pick = async (skip?: string): Promise<RouterTier | undefined> => {
      for (let k = 0; k < tiers.length; k++) {
        const tier = tiers[(cursor + k) % tiers.length]!;
        if (excluded.has(tier.name) || tier.name === skip) continue;
        if (await available(tier)) {
          if (skip === undefined) cursor = (cursor + k) % tiers.length;
          return tier;
        }
      }
      return undefined;
    };

    const record = (live: Live, extra: Partial<Attempt>): Attempt => {
      const attempt: Attempt = {
        tier: live.tier.name,
        ...extra,
        latencyMs: Math.round(performance.now() - live.started),
      };
      if (live.hedge) attempt.hedge = true;
      if (attempt.usage === undefined && Object.keys(live.usage).length > 0) {
        attempt.usage = { inputTokens: 0, outputTokens: 0, ...live.usage };
      }
      attempts.push(attempt);
      return attempt;
    };

    /** Records a failed attempt and sets where the call goes next; throws when it must stop. */
    const onFailure = async (live: Live, err: unknown) => {
      const { tier } = live;
      const failure = failureOf(err);
      const classified = classifyFailure(failure, clock.now());
      last = classified;
      const extra: Partial<Attempt> = { class: classified.class, reason: classified.reason };
      if (failure.status !== undefined) extra.status = failure.status;
      record(live, extra);
      if (live.delivered > 0) restartReason = `${tier.name}: ${classified.reason}`;
      if (classified.retryAfterMs !== undefined) {
        largestRetryAfter = Math.max(largestRetryAfter ?? 0, classified.retryAfterMs);
      }
      await failed(tier, classified, token);
      const index = tiers.indexOf(tier);
      const next = () => {
        cursor = (index + 1) % tiers.length;
      };

      switch (classified.class) {
        case 'rate_limited':
        case 'overloaded': {
          const wait =
            classified.retryAfterMs ??
            jitterBackoff(attempts.length, backoffMs, maxBackoffMs, random);
          busyRetries = busyTier === tier.name ? busyRetries + 1 : 1;
          busyTier = tier.name;
          if (busyRetries > sameTierRetries) {
            // Still busy after its retries: let the other tiers have the rest of the budget.
            excluded.add(tier.name);
            next();
          } else if (wait <= (tier.maxRetryAfterMs ?? maxRetryAfterMs)) {
            pendingWait = wait;
            cursor = index;
          } else {
            excluded.add(tier.name);
            next();
          }
          break;
        }
        case 'server':
        case 'network':
        case 'timeout':
        case 'truncated':
          pendingWait = jitterBackoff(attempts.length, backoffMs, maxBackoffMs, random);
          next();
          break;
        case 'auth':
        case 'not_found':
          if (!isDegraded(tier)) refusedUntil.set(tier.name, clock.now() + misconfiguredSkipMs);
          excluded.add(tier.name);
          next();
          break;
        case 'quota':
          excluded.add(tier.name);
          next();
          break;
        case 'context_length': {
          const window = tier.contextWindow ?? Infinity;
          for (const t of tiers) {
            if ((t.contextWindow ?? 0) <= window) excluded.add(t.name);
          }
          if (tiers.every((t) => excluded.has(t.name))) {
            throw new LlmRejectedError(
              `no tier has a context window larger than ${tier.name}'s: ${classified.reason}`,
              attempts,
              classified.class,
            );
          }
          next();
          break;
        }
        case 'bad_request':
          throw new LlmRejectedError(
            `request rejected by ${tier.name}: ${classified.reason}`,
            attempts,
            classified.class,
          );
      }
    };

    /** Makes `live` the answer the caller sees: says so if an earlier one was void, then its text. */
    const choose = (live: Live) => {
      if (!emit) return;
      if (restartReason !== undefined) {
        emit({ type: 'restart', reason: restartReason, tier: live.tier.name });
        restartReason = undefined;
      }
      live.forward = (text) => emit({ type: 'text', text });
      for (const text of live.texts) {
        live.delivered += text.length;
        emit({ type: 'text', text });
      }
      live.texts = [];
    };

    /**
     * Waits for the first of `lives` to produce its first token, starting a hedge on another tier
     * when the first one is slow. Returns the winner, or undefined when all failed first.
     */
    const race = async (primary: Live): Promise<Live | undefined> => {
      const lives = [primary];
      const failures: { live: Live; error: unknown }[] = [];
      let hedgeTimer: Promise<'hedge'> | undefined;
      let cancelHedgeTimer = () => {};
      if (hedgeAfterMs !== undefined && launched < budget) {
        hedgeTimer = new Promise<'hedge'>((resolve) => {
          cancelHedgeTimer = timer(hedgeAfterMs, () => resolve('hedge'));
        });
      }
      try {
        while (lives.length > 0) {
          const contenders: Promise<{ live: Live; ok: boolean; error?: unknown } | 'hedge'>[] =
            lives.map((live) =>
              live.first.then(
                () => ({ live, ok: true }),
                (error: unknown) => ({ live, ok: false, error }),
              ),
            );
          if (hedgeTimer) contenders.push(hedgeTimer);
          const outcome = await Promise.race(contenders);
          if (outcome === 'hedge') {
            hedgeTimer = undefined;
            const other = launched < budget ? await pick(primary.tier.name) : undefined;
            if (other && (await claimProbe(other, token))) {
              launched += 1;
              lives.push(launch(other, request, streaming, signal, true));
            }
            continue;
          }
          if (outcome.ok) {
            for (const loser of lives) {
              if (loser === outcome.live) continue;
              loser.cancel();
              await loser.result.catch(() => {});
              record(loser, { cancelled: true });
            }
            return outcome.live;
          }
          lives.splice(lives.indexOf(outcome.live), 1);
          if (signal?.aborted) throw signal.reason;
          failures.push({ live: outcome.live, error: outcome.error });
        }
      } finally {
        cancelHedgeTimer();
      }
      for (const { live, error } of failures) await onFailure(live, error);
      return undefined;
    };

    while (launched < budget) {
      const tier = await pick();
      if (!tier) break;
      if (pendingWait > 0) {
        attempts[attempts.length - 1]!.waitMs = pendingWait;
        await clock.sleep(pendingWait, signal);
        pendingWait = 0;
        // Time moved: the tier may have gone down or its breaker may have opened meanwhile.
        if (!(await available(tier))) continue;
      }
      if (!(await claimProbe(tier, token))) continue;
      signal?.throwIfAborted();
      launched += 1;
      const winner = await race(launch(tier, request, streaming, signal, false));
      if (!winner) continue;
      choose(winner);
      try {
        const response = await winner.result;
        record(winner, { usage: response.usage });
        await succeeded(winner.tier);
        return {
          ...response,
          tier: winner.tier.name,
          degraded: response.degraded || isDegraded(winner.tier),
          attempts,
        };
      } catch (err) {
        if (signal?.aborted) throw signal.reason;
        await onFailure(winner, err);
      }
    }

    const now = clock.now();
    const refused = tiers.filter((t) => (refusedUntil.get(t.name) ?? 0) > now);
    const real = tiers.filter((t) => !isDegraded(t));
    const degradedTried = tiers.every((t) => !isDegraded(t) || excluded.has(t.name));
    if (refused.length > 0 && refused.length === real.length && degradedTried) {
      throw new LlmRejectedError(
        `every tier refused the call as misconfigured (${refused.map((t) => t.name).join(', ')})${last ? `; last: ${last.reason}` : ''}`,
        attempts,
        'auth',
      );
    }
    const why = launched >= budget ? `budget of ${budget} attempts spent` : 'no tier is available';
    throw new LlmUnavailableError(
      `no LLM tier answered (${why})${last ? `; last: ${last.reason}` : ''}`,
      attempts,
      largestRetryAfter,
      availableAt(),
    );
  }

  async function* stream(
    request: LlmRequest,
    signal?: AbortSignal,
    callOptions?: CallOptions,
  ): AsyncGenerator<RoutedStreamEvent> {
    // The route runs on its own; its events queue here until the consumer pulls them.
    const controller = new AbortController();
    const relay = () => controller.abort(signal?.reason);
    signal?.addEventListener('abort', relay, { once: true });
    const queue: RoutedStreamEvent[] = [];
    let wake: (() => void) | undefined;
    let finished = false;
    let failure: { error: unknown } | undefined;
    const push = (event: RoutedStreamEvent) => {
      queue.push(event);
      wake?.();
    };
    route(request, controller.signal, push, callOptions).then(
      (response) => {
        push({ type: 'done', response });
        finished = true;
        wake?.();
      },
      (error: unknown) => {
        failure = { error };
        finished = true;
        wake?.();
      },
    );
    try {
      for (;;) {
        const event = queue.shift();
        if (event) {
          yield event;
          if (event.type === 'done') return;
          continue;
        }
        if (finished) {
          if (failure) throw failure.error;
          return;
        }
        await new Promise<void>((resolve) => (wake = resolve));
        wake = undefined;
      }
    } finally {
      signal?.removeEventListener('abort', relay);
      // A consumer that stops early cancels the call.
      if (!finished) controller.abort(new Error('stream consumer stopped'));
    }
  }

  return {
    tiers,
    complete: (request, signal, callOptions) => route(request, signal, undefined, callOptions),
    stream,
    breakers: () =>
      Object.fromEntries(
        tiers.map((t) => {
          const s = seen.get(t.name) ?? initialTierState(t.name);
          return [t.name, { state: s.breaker, failures: s.failures, openUntil: s.openUntil }];
        }),
      ),
    misconfigured: () =>
      tiers.filter((t) => (seen.get(t.name)?.misconfigured ?? null) !== null).map((t) => t.name),
    downUntil: () => {
      const now = clock.now();
      return Object.fromEntries(
        tiers
          .map((t) => [t.name, seen.get(t.name)?.downUntil ?? 0] as const)
          .filter(([, until]) => until > now),
      );
    },
  };
}
