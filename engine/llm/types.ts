/**
 * One request and response shape for every LLM provider. Provider adapters (`adapters/llm/`)
 * translate both ways; the router and the journal only ever see these types.
 */

export type TextPart = { type: 'text'; text: string };
export type ImagePart = {
  type: 'image';
  /** base64 data, or a URL the provider fetches itself. */
  source: { kind: 'base64'; mediaType: string; data: string } | { kind: 'url'; url: string };
};
export type ToolCallPart = { type: 'tool_call'; id: string; name: string; input: unknown };
export type ToolResultPart = {
  type: 'tool_result';
  toolCallId: string;
  content: string;
  isError?: boolean;
};
export type ContentPart = TextPart | ImagePart | ToolCallPart | ToolResultPart;

export type LlmMessage =
  | { role: 'user'; content: string | (TextPart | ImagePart | ToolResultPart)[] }
  | { role: 'assistant'; content: string | (TextPart | ToolCallPart)[] };

export type LlmTool = {
  name: string;
  description?: string;
  /** JSON Schema of the tool's input object. */
  inputSchema: Record<string, unknown>;
};

export type ToolChoice = 'auto' | 'none' | 'required' | { name: string };

export type LlmRequest = {
  system?: string;
  messages: LlmMessage[];
  maxTokens: number;
  /** Provider-specific model id; the tier's own model when omitted. */
  model?: string;
  tools?: LlmTool[];
  toolChoice?: ToolChoice;
  temperature?: number;
  stopSequences?: string[];
  /** Ask for a JSON object as the whole answer. */
  json?: boolean;
};

export type StopReason = 'end' | 'max_tokens' | 'stop_sequence' | 'tool_use' | 'refusal' | 'other';

export type LlmUsage = {
  inputTokens: number;
  outputTokens: number;
  cacheReadTokens?: number;
  cacheWriteTokens?: number;
};

export type LlmResponse = {
  text: string;
  toolCalls: { id: string; name: string; input: unknown }[];
  stopReason: StopReason;
  usage: LlmUsage;
  provider: string;
  model: string;
  /** The router's tier that answered (set by the router; adapters leave it empty). */
  tier: string;
  /** True when the answer came from the offline degraded tier. */
  degraded: boolean;
  latencyMs: number;
};

/**
 * What a failure means for the router, by what it should do next:
 * - `rate_limited`, `overloaded`: retry on the same tier after `retryAfterMs` (or backoff), or move on
 *   if the wait is longer than the limit;
 * - `server`, `network`, `timeout`: backoff, then the next tier;
 * - `quota`: the tier is down for a long cooldown;
 * - `auth`, `not_found`: the tier is misconfigured; skip it and say so loudly;
 * - `context_length`: only a tier with a larger context window can answer;
 * - `bad_request`: the request itself is wrong; fail at once, on every tier;
 * - `truncated`: a stream ended without its end event; retry or fail over, never record it.
 */
export const FailureClass = {
  rateLimited: 'rate_limited',
  overloaded: 'overloaded',
  server: 'server',
  network: 'network',
  timeout: 'timeout',
  quota: 'quota',
  auth: 'auth',
  notFound: 'not_found',
  contextLength: 'context_length',
  badRequest: 'bad_request',
  truncated: 'truncated',
} as const;
export type FailureClass = (typeof FailureClass)[keyof typeof FailureClass];

/** A provider failure as the adapters see it: what the wire said, with no SDK types. */
export type ProviderFailure = {
  /** HTTP status; absent for network errors and for error events inside a 200 stream. */
  status?: number;
  /** The error body (parsed JSON when it was JSON, else its text). */
  body?: unknown;
  headers?: Record<string, string>;
  /** Node's error code for network failures (ECONNREFUSED, ECONNRESET, ...). */
  code?: string;
  /** The adapter's own verdict for failures without a status: timeouts and cut streams. */
  kind?: 'timeout' | 'truncated' | 'network';
  message: string;
};

export type Classified = {
  class: FailureClass;
  /** The wait the provider asked for, in ms, from retry-after-ms / retry-after. */
  retryAfterMs?: number;
  /** A short reason for logs and `keel show` (never a key or a prompt). */
  reason: string;
};

/** What a provider's stream yields: text as it arrives, usage as soon as it is known, then the answer. */
export type ProviderStreamEvent =
  | { type: 'text'; text: string }
  /** Usage reported mid-stream (Anthropic's `message_start`); cumulative, not a delta. */
  | { type: 'usage'; usage: Partial<LlmUsage> }
  | { type: 'done'; response: LlmResponse };

/**
 * What `ctx.llm.stream()` yields. `restart` says that text already delivered is void: the call
 * failed after its first token and starts again on `tier`; what follows is a whole new answer.
 */
export type LlmStreamEvent =
  | { type: 'text'; text: string }
  | { type: 'restart'; reason: string; tier: string }
  | { type: 'done'; response: LlmResponse };

/**
 * Anything that answers a unified request. Failures are thrown as errors with a `failure:
 * ProviderFailure` field, never with a key in their message. A stream that ends without its end
 * event throws a failure of kind `truncated`; an error event inside a 200 stream throws a failure
 * with the event's body and no status.
 */
export interface LlmProvider {
  /** `anthropic`, `openai`, `ollama`, ... as shown to users. */
  name: string;
  /** The model used when a request names none. */
  model: string;
  complete(request: LlmRequest, signal?: AbortSignal): Promise<LlmResponse>;
  stream?(request: LlmRequest, signal?: AbortSignal): AsyncIterable<ProviderStreamEvent>;
}

/** Price of a tier's tokens in US dollars per million tokens. */
export type TierPrice = {
  input: number;
  output: number;
  cacheRead?: number;
  cacheWrite?: number;
};
