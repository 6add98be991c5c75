/**
 * What the router knows about each tier across calls: its circuit breaker, a quota cooldown and
 * whether it was found misconfigured. Kept behind {@link TierStateStore} so that every process and
 * worker on one database agrees that a provider is down (the SQLite store implements it); the
 * in-memory store serves a router used on its own.
 */

export type BreakerPosition = 'closed' | 'open' | 'half_open';

export type TierState = {
  tier: string;
  breaker: BreakerPosition;
  /** Consecutive failures that count against the breaker. */
  failures: number;
  /** While open: when a probe may be tried. */
  openUntil: number;
  /** While half-open: the caller probing the tier, and until when no other caller may. */
  probeOwner: string | null;
  probeUntil: number;
  /** After a `quota` failure: when the tier may be used again. */
  downUntil: number;
  /** Why the tier was last found misconfigured (`auth`, `not_found`), or null. */
  misconfigured: string | null;
  updatedAt: number;
};

export interface TierStateStore {
  readTierState(tier: string): Promise<TierState | undefined>;
  /**
   * Applies `change` to the tier's state (a fresh closed state when it has none) atomically with
   * respect to other callers on the same store, and returns the state written.
   */
  updateTierState(tier: string, change: (current: TierState) => TierState): Promise<TierState>;
  listTierStates(): Promise<TierState[]>;
}

export const initialTierState = (tier: string): TierState => ({
  tier,
  breaker: 'closed',
  failures: 0,
  openUntil: 0,
  probeOwner: null,
  probeUntil: 0,
  downUntil: 0,
  misconfigured: null,
  updatedAt: 0,
});

/** Tier state in this process only. */
export function memoryTierStates(): TierStateStore {
  const states = new Map<string, TierState>();
  return {
    readTierState: (tier) => Promise.resolve(states.get(tier)),
    updateTierState: (tier, change) => {
      const next = change(states.get(tier) ?? initialTierState(tier));
      states.set(tier, next);
      return Promise.resolve(next);
    },
    listTierStates: () => Promise.resolve([...states.values()]),
  };
}
