/**
 * The LLM router: one call tried over an ordered list of tiers (providers), with one attempt budget
 * for the whole call, per-class retry policy, a quota cooldown and a circuit breaker per tier.
 * Pure engine policy: providers are plain objects, time comes from a {@link Clock}, and nothing
 * here is stored.
 */
import { backoffMs as jitterBackoff, type Clock } from '../time.ts';
import { classifyFailure } from './classify.ts';
import type {
  Classified,
  FailureClass,
  LlmProvider,
  LlmRequest,
  LlmResponse,
  ProviderFailure,
} from './types.ts';

export type { LlmProvider };

export type RouterTier = {
  name: string;
  provider: LlmProvider;
  /** The tier's context window in tokens; used to pick a larger tier on `context_length`. */
  contextWindow?: number;
  /** The longest provider-asked wait this tier is retried after; the router's default if absent. */
  maxRetryAfterMs?: number;
};

/** One request sent to a tier, and how it failed (no class when it answered). */
export type Attempt = {
  tier: string;
  class?: FailureClass;
  status?: number;
  /** The wait slept after this attempt, before the next one. */
  waitMs?: number;
};

export type BreakerState = {
  state: 'closed' | 'open' | 'half_open';
  failures: number;
  openUntil: number;
};

export type RouterOptions = {
  tiers: RouterTier[];
  /** Total requests for one call, across all tiers. */
  budget?: number;
  clock: Clock;
  random?: () => number;
  maxRetryAfterMs?: number;
  backoffMs?: number;
  maxBackoffMs?: number;
  breaker?: { failureThreshold?: number; cooldownMs?: number };
  quotaCooldownMs?: number;
};

export type RoutedResponse = LlmResponse & { attempts: Attempt[] };

export type Router = {
  complete(request: LlmRequest, signal?: AbortSignal): Promise<RoutedResponse>;
  breakers(): Record<string, BreakerState>;
  /** Tiers that answered `auth` or `not_found`, in the order they were found. */
  misconfigured(): string[];
  /** Tiers down after a `quota` failure, with the time they may be used again. */
  downUntil(): Record<string, number>;
};

/** No tier could answer within the budget; worth trying again later. */
export class LlmUnavailableError extends Error {
  override name = 'LlmUnavailableError';
  readonly attempts: Attempt[];
  /** The largest wait a provider asked for during the call, if any. */
  readonly retryAfterMs: number | undefined;

  constructor(message: string, attempts: Attempt[], retryAfterMs: number | undefined) {
    super(message);
    this.attempts = attempts;
    this.retryAfterMs = retryAfterMs;
  }
}

/** The request itself cannot be answered (`bad_request`, or too long for every tier). */
export class LlmRejectedError extends Error {
  override name = 'LlmRejectedError';
  readonly attempts: Attempt[];
  readonly failureClass: FailureClass;

  constructor(message: string, attempts: Attempt[], failureClass: FailureClass) {
    super(message);
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
  } = options;
  const failureThreshold = options.breaker?.failureThreshold ?? 3;
  const cooldownMs = options.breaker?.cooldownMs ?? 30_000;
  if (tiers.length === 0) throw new Error('createRouter needs at least one tier');
  const names = new Set(tiers.map((t) => t.name));
  if (names.size !== tiers.length) throw new Error('createRouter: tier names must be unique');

  const breakers = new Map<string, BreakerState & { probing: boolean }>(
    tiers.map((t) => [t.name, { state: 'closed', failures: 0, openUntil: 0, probing: false }]),
  );
  const down = new Map<string, number>();
  const misconfigured: string[] = [];

  const breakerOf = (tier: RouterTier) => breakers.get(tier.name)!;

  /** Whether a tier may take a request now (moving an expired open breaker to half-open). */
  const available = (tier: RouterTier): boolean => {
    const now = clock.now();
    const until = down.get(tier.name);
    if (until !== undefined) {
      if (now < until) return false;
      down.delete(tier.name);
    }
    const b = breakerOf(tier);
    if (b.state === 'open') {
      if (now < b.openUntil) return false;
      b.state = 'half_open';
    }
    if (b.state === 'half_open' && b.probing) return false;
    return true;
  };

  const succeeded = (tier: RouterTier) => {
    const b = breakerOf(tier);
    b.state = 'closed';
    b.failures = 0;
    b.openUntil = 0;
    b.probing = false;
  };

  const failed = (tier: RouterTier, cls: FailureClass) => {
    const b = breakerOf(tier);
    const wasProbe = b.state === 'half_open';
    b.probing = false;
    if (BREAKER_CLASSES.has(cls)) b.failures += 1;
    if (wasProbe || (BREAKER_CLASSES.has(cls) && b.failures >= failureThreshold)) {
      b.state = 'open';
      b.openUntil = clock.now() + cooldownMs;
    }
  };

  async function complete(request: LlmRequest, signal?: AbortSignal): Promise<RoutedResponse> {
    const attempts: Attempt[] = [];
    /** Tiers this call will not use again. */
    const excluded = new Set<string>();
    let cursor = 0;
    let pendingWait = 0;
    let largestRetryAfter: number | undefined;
    let last: Classified | undefined;

    const pick = (): RouterTier | undefined => {
      for (let k = 0; k < tiers.length; k++) {
        const tier = tiers[(cursor + k) % tiers.length]!;
        if (excluded.has(tier.name)) continue;
        if (available(tier)) {
          cursor = (cursor + k) % tiers.length;
          return tier;
        }
      }
      return undefined;
    };

    while (attempts.length < budget) {
      const tier = pick();
      if (!tier) break;
      if (pendingWait > 0) {
        attempts[attempts.length - 1]!.waitMs = pendingWait;
        await clock.sleep(pendingWait, signal);
        pendingWait = 0;
        // Time moved: the tier may have gone down or its breaker may have opened meanwhile.
        if (!available(tier)) continue;
      }
      const b = breakerOf(tier);
      if (b.state === 'half_open') b.probing = true;
      signal?.throwIfAborted();
      try {
        const response = await tier.provider.complete(request, signal);
        attempts.push({ tier: tier.name });
        succeeded(tier);
        return { ...response, tier: tier.name, attempts };
      } catch (err) {
        if (signal?.aborted) {
          b.probing = false;
          throw signal.reason;
        }
        const failure = failureOf(err);
        const classified = classifyFailure(failure, clock.now());
        last = classified;
        const attempt: Attempt = { tier: tier.name, class: classified.class };
        if (failure.status !== undefined) attempt.status = failure.status;
        attempts.push(attempt);
        if (classified.retryAfterMs !== undefined) {
          largestRetryAfter = Math.max(largestRetryAfter ?? 0, classified.retryAfterMs);
        }
        failed(tier, classified.class);
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
            if (wait <= (tier.maxRetryAfterMs ?? maxRetryAfterMs)) {
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
          case 'quota':
            down.set(tier.name, clock.now() + quotaCooldownMs);
            excluded.add(tier.name);
            next();
            break;
          case 'auth':
          case 'not_found':
            if (!misconfigured.includes(tier.name)) misconfigured.push(tier.name);
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
      }
    }

    const why =
      attempts.length >= budget ? `budget of ${budget} attempts spent` : 'no tier is available';
    throw new LlmUnavailableError(
      `no LLM tier answered (${why})${last ? `; last: ${last.reason}` : ''}`,
      attempts,
      largestRetryAfter,
    );
  }

  return {
    complete,
    breakers: () =>
      Object.fromEntries(
        [...breakers].map(([name, b]) => [
          name,
          { state: b.state, failures: b.failures, openUntil: b.openUntil },
        ]),
      ),
    misconfigured: () => [...misconfigured],
    downUntil: () => Object.fromEntries(down),
  };
}
