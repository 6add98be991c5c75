/** Durations and the clock. Every read of the time in the engine goes through a {@link Clock}. */
import { InputError } from './errors.ts';

/** Milliseconds, or a string such as `"250ms"`, `"20m"`, `"1.5h"`, `"2d"`. */
export type Duration = number | string;

const UNIT_MS: Record<string, number> = { ms: 1, s: 1_000, m: 60_000, h: 3_600_000, d: 86_400_000 };

export function toMs(duration: Duration, what = 'duration'): number {
  if (typeof duration === 'number') {
    if (Number.isFinite(duration) && duration >= 0) return duration;
  } else {
    const match = /^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)\s*$/.exec(duration);
    if (match) return Math.round(Number(match[1]) * UNIT_MS[match[2] as string]!);
  }
  throw new InputError(`Invalid ${what}: ${JSON.stringify(duration)}.`, {
    hint: 'Use milliseconds (a number >= 0) or a string such as "500ms", "30s", "20m", "2h", "1d".',
  });
}

export interface Clock {
  now(): number;
  sleep(ms: number, signal?: AbortSignal): Promise<void>;
}

export const systemClock: Clock = {
  now: () => Date.now(),
  sleep: (ms, signal) =>
    new Promise<void>((resolve, reject) => {
      if (signal?.aborted) return reject(signal.reason as Error);
      const timer = setTimeout(() => {
        signal?.removeEventListener('abort', onAbort);
        resolve();
      }, ms);
      const onAbort = () => {
        clearTimeout(timer);
        reject(signal?.reason as Error);
      };
      signal?.addEventListener('abort', onAbort, { once: true });
    }),
};

/** Exponential backoff with full jitter: a uniform wait in [0, min(max, base * 2^(attempt-1))]. */
export function backoffMs(attempt: number, baseMs: number, maxMs: number, random = Math.random) {
  const ceiling = Math.min(maxMs, baseMs * 2 ** Math.max(0, attempt - 1));
  return Math.floor(random() * ceiling);
}
