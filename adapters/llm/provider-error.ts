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

/**
 * Keys that are public, not secrets: the placeholders local servers take (Ollama's `ollama`, LM
 * Studio's `lm-studio`) and the one sent to a server that needs none. They are not scrubbed, since
 * replacing them would mangle ordinary text ("registry.ollama.ai" would read "registry.[key].ai").
 */
export const PUBLIC_KEYS: ReadonlySet<string> = new Set(['ollama', 'lm-studio', 'none']);

/** Replaces the key, and anything shaped like a provider key, in every string of a value. */
export function scrubSecrets<T>(value: T, apiKey: string): T {
  if (typeof value === 'string') {
    const secret = apiKey.length >= 4 && !PUBLIC_KEYS.has(apiKey);
    const s = secret ? value.split(apiKey).join('[key]') : value;
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

/**
 * What an aborted call rethrows: the signal's own reason, so that the caller that aborted (a
 * router's timer, a lost hedge) recognises its abort instead of seeing a provider failure.
 */
export function abortReason(signal: AbortSignal): unknown {
  return signal.reason ?? new DOMException('This operation was aborted', 'AbortError');
}

/** True when a body read failed because the connection went away (not a parse error). */
function isConnectionLoss(err: unknown): boolean {
  return (
    networkCode(err) !== undefined || (err instanceof TypeError && err.message === 'terminated')
  );
}

/**
 * The failure for a stream whose connection failed after the response headers. A server that
 * closed the connection (a clean end, or undici's "other side closed") cut the answer short:
 * `truncated`. A connection that broke (a reset, a broken pipe) is a `network` failure with its
 * code. Either way the message says how much text had arrived. Anything else thrown while reading
 * (a malformed event) is reported with its message only.
 */
export function midStreamFailure(err: unknown, textChars: number): ProviderFailure {
  if (!isConnectionLoss(err)) {
    const message = err instanceof Error ? err.message : String(err);
    return { message: `malformed stream after ${textChars} text characters: ${message}` };
  }
  const code = networkCode(err);
  if (code !== undefined && code !== 'UND_ERR_SOCKET') {
    return {
      kind: 'network',
      code,
      message: `connection lost (${code}) after ${textChars} text characters`,
    };
  }
  return {
    kind: 'truncated',
    ...(code === undefined ? {} : { code }),
    message: `stream cut after ${textChars} text characters: the server closed the connection`,
  };
}

/** The failure for a stream that ended cleanly but without `what` (its end event). */
export function truncatedFailure(textChars: number, what: string): ProviderFailure {
  return {
    kind: 'truncated',
    message: `stream ended without ${what} after ${textChars} text characters`,
  };
}

/**
 * The failure for an error event inside a 200 stream: no status, the event's parsed data as the
 * body (what the classifier reads), and a message naming the error's type or code.
 */
export function errorEventFailure(body: unknown, textChars: number): ProviderFailure {
  const error = isRecord(body) ? body.error : undefined;
  const detail = isRecord(error) ? error : {};
  const text = (v: unknown): string | undefined =>
    typeof v === 'string' && v !== '' ? v : undefined;
  // The error's type (Anthropic) or code (OpenAI), then what the server said.
  const words = [text(detail.type) ?? text(detail.code), text(detail.message)].filter(
    (v): v is string => v !== undefined,
  );
  const what = words.length ? words.join(': ') : 'unknown error';
  return { body, message: `error event after ${textChars} text characters: ${what}` };
}

function isRecord(value: unknown): value is Record<string, unknown> {
  return typeof value === 'object' && value !== null && !Array.isArray(value);
}

/** Throws a clear error when an option that must be a positive number of `unit` is not one. */
export function requirePositive(option: string, value: number | undefined, unit: string): void {
  if (value === undefined || (Number.isFinite(value) && value > 0)) return;
  throw new Error(`${option} must be a positive number of ${unit}, got ${String(value)}`);
}
