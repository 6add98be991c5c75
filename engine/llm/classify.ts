/**
 * Turns what a provider said on the wire (status, error body, headers, network code) into a
 * failure class the router acts on, with the wait the provider asked for. Pure and deterministic:
 * the only clock is the `now` argument, used for an HTTP-date `retry-after`.
 *
 * The reason it returns is built only from the status, a short snake_case error identifier from
 * the body, the network code and the retry-after wait: never from an error message, which may echo
 * the prompt, nor from any other header.
 */
import { FailureClass, type Classified, type ProviderFailure } from './types.ts';

/** Node and undici error codes that mean the connection itself failed. */
export const NETWORK_ERROR_CODES: readonly string[] = [
  'ECONNREFUSED',
  'ECONNRESET',
  'ECONNABORTED',
  'EPIPE',
  'ETIMEDOUT',
  'ENOTFOUND',
  'EAI_AGAIN',
  'EHOSTUNREACH',
  'ENETUNREACH',
  'UND_ERR_SOCKET',
  'UND_ERR_CONNECT_TIMEOUT',
];

/**
 * Wordings of "the prompt does not fit the context window", matched case-insensitively against an
 * error message: Anthropic's and OpenAI's own, and those of the common local servers.
 */
export const CONTEXT_OVERFLOW_PATTERNS: readonly RegExp[] = [
  // Anthropic: "prompt is too long: 210000 tokens > 200000 maximum"
  /prompt is too long/i,
  // OpenAI and vLLM: "This model's maximum context length is 4096 tokens. However, you requested ..."
  /maximum context length is/i,
  // OpenAI error code when it shows up in the text
  /context_length_exceeded/i,
  // llama.cpp server: "the request exceeds the available context size, try increasing it"
  /exceeds? the available context size/i,
  // Ollama and others: "input length exceeds the context length", "exceeds the context window"
  /exceeds? (?:the )?(?:model'?s? )?(?:maximum )?context (?:length|window|size)/i,
  // LM Studio: "Trying to keep the first 5000 tokens when context the overflows. However, the
  // model is loaded with context length of only 4096 tokens, ..."
  /when context the overflows/i,
  /context length of only/i,
  // Generic: "too many tokens", "context length exceeded", "context window exceeded"
  /too many tokens/i,
  /context (?:length|window|size) (?:was |has been )?exceeded/i,
  // Text Generation Inference: "`inputs` tokens + `max_new_tokens` must be <= 4096"
  /`?inputs`? tokens \+ `?max_new_tokens`? must be <=/i,
];

/** True when an error message says the prompt is longer than the model's context window. */
export const isContextOverflowMessage = (message: string): boolean =>
  CONTEXT_OVERFLOW_PATTERNS.some((pattern) => pattern.test(message));

const MAX_REASON = 200;
const IDENTIFIER = /^[a-z][a-z0-9_]{0,63}$/;
const NUMBER = /^\d+(?:\.\d+)?$/;
const HTTP_DATE = /^[A-Za-z]{3,9},? /;

type BodyInfo = {
  /** The human message, used only for matching, never copied into the reason. */
  message?: string;
  /** Short snake_case identifiers from the body (code first, then type), safe to log. */
  identifiers: string[];
};

const isRecord = (value: unknown): value is Record<string, unknown> =>
  typeof value === 'object' && value !== null && !Array.isArray(value);

const readBody = (body: unknown): BodyInfo => {
  const info: BodyInfo = { identifiers: [] };
  const addIdentifier = (value: unknown) => {
    if (typeof value === 'string' && IDENTIFIER.test(value) && value !== 'error') {
      info.identifiers.push(value);
    }
  };
  if (typeof body === 'string') {
    info.message = body;
    return info;
  }
  if (!isRecord(body)) return info;
  const error = body.error;
  if (typeof error === 'string') {
    info.message = error;
  } else if (isRecord(error)) {
    if (typeof error.message === 'string') info.message = error.message;
    addIdentifier(error.code);
    addIdentifier(error.type);
  }
  if (info.message === undefined && typeof body.message === 'string') info.message = body.message;
  addIdentifier(body.code);
  addIdentifier(body.type);
  return info;
};

const header = (headers: Record<string, string> | undefined, name: string): string | undefined => {
  if (!headers) return undefined;
  const direct = headers[name];
  if (direct !== undefined) return direct;
  for (const [key, value] of Object.entries(headers)) {
    if (key.toLowerCase() === name) return value;
  }
  return undefined;
};

/** Whole milliseconds, rounded up, without float noise (0.3 s is 300 ms, not 301). */
const toMs = (value: number, scale: number): number =>
  Math.ceil(Math.round(value * scale * 1000) / 1000);

/**
 * The wait a failure asks for: `retry-after-ms` (milliseconds) first, else `retry-after` in
 * seconds or as an HTTP date (the wait from `now`, never negative). Unparseable values are ignored.
 */
export const parseRetryAfter = (
  headers: Record<string, string> | undefined,
  now: number = Date.now(),
): number | undefined => {
  const ms = header(headers, 'retry-after-ms')?.trim();
  if (ms !== undefined && NUMBER.test(ms)) return toMs(Number(ms), 1);
  const after = header(headers, 'retry-after')?.trim();
  if (after === undefined) return undefined;
  if (NUMBER.test(after)) return toMs(Number(after), 1000);
  if (HTTP_DATE.test(after)) {
    const at = Date.parse(after);
    if (!Number.isNaN(at)) return Math.max(0, at - now);
  }
  return undefined;
};

const WORDS: Record<FailureClass, string> = {
  rate_limited: 'rate limited',
  overloaded: 'overloaded',
  server: 'server error',
  network: 'network error',
  timeout: 'timeout',
  quota: 'quota exhausted',
  auth: 'not authorized',
  not_found: 'not found',
  context_length: 'context length exceeded',
  bad_request: 'bad request',
  truncated: 'stream truncated',
};

/** The class a body identifier names on its own, whatever the status. */
const classOfIdentifier = (identifier: string): FailureClass | undefined => {
  switch (identifier) {
    case 'insufficient_quota':
      return FailureClass.quota;
    case 'overloaded_error':
      return FailureClass.overloaded;
    case 'context_length_exceeded':
    case 'request_too_large':
      return FailureClass.contextLength;
    default:
      return undefined;
  }
};

/** The class a body identifier implies when there is no status (an error event in a stream). */
const classOfStatuslessIdentifier = (identifier: string): FailureClass | undefined => {
  switch (identifier) {
    case 'rate_limit_error':
    case 'rate_limit_exceeded':
      return FailureClass.rateLimited;
    case 'api_error':
    case 'server_error':
      return FailureClass.server;
    case 'authentication_error':
    case 'permission_error':
    case 'invalid_api_key':
      return FailureClass.auth;
    case 'not_found_error':
    case 'model_not_found':
      return FailureClass.notFound;
    case 'invalid_request_error':
      return FailureClass.badRequest;
    default:
      return undefined;
  }
};

const fromStatus = (status: number, overflow: boolean): FailureClass => {
  if (status === 529) return FailureClass.overloaded;
  if (status === 429) return FailureClass.rateLimited;
  if (status === 401 || status === 403) return FailureClass.auth;
  if (status === 404) return FailureClass.notFound;
  if (status === 408) return FailureClass.timeout;
  if (status === 413) return FailureClass.contextLength;
  if (status >= 400 && status < 500) {
    return overflow ? FailureClass.contextLength : FailureClass.badRequest;
  }
  return FailureClass.server;
};

/** Classifies one provider failure; `now` (ms since epoch) resolves an HTTP-date retry-after. */
export const classifyFailure = (failure: ProviderFailure, now: number = Date.now()): Classified => {
  const retryAfterMs = parseRetryAfter(failure.headers, now);
  const finish = (cls: FailureClass, detail: string): Classified => {
    let reason = detail;
    if (retryAfterMs !== undefined) reason += ` (retry after ${retryAfterMs} ms)`;
    reason = reason.slice(0, MAX_REASON);
    return retryAfterMs === undefined
      ? { class: cls, reason }
      : { class: cls, retryAfterMs, reason };
  };

  if (failure.kind === 'truncated') return finish(FailureClass.truncated, WORDS.truncated);
  if (failure.kind === 'timeout') return finish(FailureClass.timeout, WORDS.timeout);

  const { status } = failure;
  const body = readBody(failure.body);
  const identifier = body.identifiers[0];
  const overflow = body.message !== undefined && isContextOverflowMessage(body.message);
  const named = body.identifiers.map(classOfIdentifier).find((cls) => cls !== undefined);

  if (status === undefined) {
    const code = failure.code;
    if (failure.kind === 'network' || (code !== undefined && NETWORK_ERROR_CODES.includes(code))) {
      const safeCode = code !== undefined && /^[A-Z][A-Z0-9_]{0,39}$/.test(code) ? ` ${code}` : '';
      return finish(FailureClass.network, `${WORDS.network}${safeCode}`);
    }
    const fromBody =
      named ??
      (overflow ? FailureClass.contextLength : undefined) ??
      body.identifiers.map(classOfStatuslessIdentifier).find((cls) => cls !== undefined);
    if (fromBody !== undefined) {
      const naming =
        body.identifiers.find(
          (id) => (classOfIdentifier(id) ?? classOfStatuslessIdentifier(id)) === fromBody,
        ) ?? identifier;
      return finish(fromBody, `${naming ?? WORDS[fromBody]} in stream`);
    }
    return finish(FailureClass.server, 'unknown failure');
  }

  let cls = fromStatus(status, overflow);
  if (named === FailureClass.quota && status === 429) cls = FailureClass.quota;
  if (named === FailureClass.overloaded) cls = FailureClass.overloaded;
  if (named === FailureClass.contextLength && status >= 400 && status < 500) {
    if (status !== 401 && status !== 403 && status !== 404 && status !== 429) {
      cls = FailureClass.contextLength;
    }
  }
  const naming = body.identifiers.find((id) => classOfIdentifier(id) === cls) ?? identifier;
  return finish(cls, `${status} ${naming ?? WORDS[cls]}`);
};
