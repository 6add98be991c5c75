/**
 * A failed call to a provider, as every adapter reports it: what the wire said (`failure`), with no
 * SDK types and never an API key, for the engine's classifier to turn into a decision.
 */
import type { ProviderFailure } from '../../engine/llm/types.ts';

export class ProviderError extends Error {
  override name = 'ProviderError';
  readonly provider: string;
  readonly failure: ProviderFailure;

  constructor(provider: string, failure: ProviderFailure) {
    super(`${provider}: ${failure.message}`);
    this.provider = provider;
    this.failure = failure;
  }
}

/** Replaces the key, and anything shaped like a provider key, in every string of a value. */
export function scrubSecrets<T>(value: T, apiKey: string): T {
  if (typeof value === 'string') {
    const s = apiKey.length >= 4 ? value.split(apiKey).join('[key]') : value;
    return s.replace(/\b(sk|xai)-[A-Za-z0-9_*-]{6,}/g, '[key]') as T;
  }
  if (Array.isArray(value)) {
    return (value as unknown[]).map((v) => scrubSecrets(v, apiKey)) as T;
  }
  if (typeof value === 'object' && value !== null) {
    const entries = Object.entries(value as Record<string, unknown>).map(
      ([k, v]): [string, unknown] => [k, scrubSecrets(v, apiKey)],
    );
    return Object.fromEntries(entries) as T;
  }
  return value;
}

/** The Node network error code (ECONNREFUSED, ECONNRESET, …) somewhere in an error's causes. */
export function networkCode(err: unknown): string | undefined {
  let current: unknown = err;
  for (let depth = 0; depth < 6 && typeof current === 'object' && current !== null; depth++) {
    const code = (current as { code?: unknown }).code;
    if (typeof code === 'string' && /^(E[A-Z_]+|UND_ERR_[A-Z_]+)$/.test(code)) return code;
    current = (current as { cause?: unknown }).cause;
  }
  return undefined;
}

/** Response headers as a plain object with lowercase names. */
export function plainHeaders(headers: unknown): Record<string, string> | undefined {
  if (!headers) return undefined;
  const out: Record<string, string> = {};
  for (const [key, value] of headers as Iterable<[string, string]>) out[key.toLowerCase()] = value;
  return out;
}
