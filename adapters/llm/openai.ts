/**
 * The OpenAI Chat Completions adapter, over the official `openai` SDK. It also serves every
 * OpenAI-compatible server (Ollama, LM Studio, llama.cpp, vLLM) and the hosted providers with an
 * OpenAI-compatible endpoint, through `PRESETS`.
 */
import {
  ProviderError,
  abortReason,
  errorEventFailure,
  midStreamFailure,
  networkCode,
  plainHeaders,
  requirePositive,
  scrubSecrets,
  truncatedFailure,
} from './provider-error.ts';
import OpenAI, { APIConnectionTimeoutError, APIError } from 'openai';
import type {
  ChatCompletion,
  ChatCompletionChunk,
  ChatCompletionContentPart,
  ChatCompletionCreateParamsNonStreaming,
  ChatCompletionMessageFunctionToolCall,
  ChatCompletionMessageParam,
  ChatCompletionToolChoiceOption,
} from 'openai/resources/chat/completions';
import type { CompletionUsage } from 'openai/resources/completions';
import { _iterSSEMessages } from 'openai/streaming';
import type {
  LlmMessage,
  LlmProvider,
  LlmRequest,
  LlmResponse,
  LlmUsage,
  ProviderFailure,
  ProviderStreamEvent,
  StopReason,
  ToolChoice,
} from '../../engine/llm/types.ts';

/** Endpoints that speak the OpenAI wire format. Configuration only: nothing here is contacted. */
export const PRESETS = {
  ollama: { baseURL: 'http://127.0.0.1:11434/v1', apiKey: 'ollama' },
  lmstudio: { baseURL: 'http://127.0.0.1:1234/v1', apiKey: 'lm-studio' },
  gemini: {
    baseURL: 'https://generativelanguage.googleapis.com/v1beta/openai/',
    apiKeyEnv: 'GEMINI_API_KEY',
  },
  xai: { baseURL: 'https://api.x.ai/v1', apiKeyEnv: 'XAI_API_KEY' },
} as const;
export { ProviderError };

export type PresetName = keyof typeof PRESETS;

export type OpenAIProviderOptions = {
  apiKey: string;
  baseURL: string;
  /** The model used when a request names none. */
  model: string;
  /** The provider name in responses and errors; `openai` by default. */
  name?: string;
  /** `complete()`: the whole call, headers and body (the SDK's own timeout ends at the headers). */
  timeoutMs?: number;
  /**
   * `stream()`: how long to wait for the response headers (`timeoutMs` when omitted). Once the
   * stream has started no timer here cuts it: time-to-first-token and idle limits are the
   * caller's, through the abort signal.
   */
  connectTimeoutMs?: number;
  /**
   * Check every answer's `usage.prompt_tokens` against the prompt, for servers that silently cut
   * a prompt to their context window and answer the rest (Ollama). A prompt that came back
   * shorter than it can be, or that filled `contextWindow`, throws a `context_length` failure.
   */
  detectTruncation?: { contextWindow?: number };
};

export type OpenAIProvider = LlmProvider & {
  stream(request: LlmRequest, signal?: AbortSignal): AsyncIterable<ProviderStreamEvent>;
};

/** A provider call that failed, as the wire said it; its message never holds the key. */

/** The options for a preset, its key taken from `env` for the hosted ones. */
export function presetOptions(
  preset: PresetName,
  model: string,
  env: Record<string, string | undefined> = process.env,
): OpenAIProviderOptions {
  const p = PRESETS[preset];
  const apiKey = 'apiKey' in p ? p.apiKey : env[p.apiKeyEnv];
  if (!apiKey) {
    throw new Error(`preset ${preset} needs ${'apiKeyEnv' in p ? p.apiKeyEnv : 'a key'}`);
  }
  const options: OpenAIProviderOptions = { apiKey, baseURL: p.baseURL, model, name: preset };
  // Ollama cuts an over-long prompt to its window without an error and answers what is left.
  if (preset === 'ollama') options.detectTruncation = {};
  return options;
}

export function openaiProvider(options: OpenAIProviderOptions): OpenAIProvider {
  const name = options.name ?? 'openai';
  requirePositive('connectTimeoutMs', options.connectTimeoutMs, 'milliseconds');
  requirePositive(
    'detectTruncation.contextWindow',
    options.detectTruncation?.contextWindow,
    'tokens',
  );
  const client = new OpenAI({
    apiKey: options.apiKey,
    baseURL: options.baseURL,
    maxRetries: 0,
    // The SDK's own debug log (ANTHROPIC_LOG / OPENAI_LOG) prints error bodies, which may echo the
    // key: keel reports failures itself, scrubbed.
    logLevel: 'off',
    ...(options.timeoutMs !== undefined ? { timeout: options.timeoutMs } : {}),
  });
  return {
    name,
    model: options.model,
    async complete(request, signal) {
      const params = toOpenAIParams(request, options.model);
      const started = performance.now();
      // The SDK's own timeout stops at the response headers; a body that never comes would hang,
      // so the whole call runs under a timer of its own. The caller's signal is relayed by a
      // listener: AbortSignal.any costs more than the rest of the router together.
      const timed = options.timeoutMs !== undefined ? new AbortController() : undefined;
      const relay = () => timed?.abort(signal?.reason);
      if (timed) signal?.addEventListener('abort', relay, { once: true });
      let timedOut = false;
      const handle = timed
        ? setTimeout(() => {
            timedOut = true;
            timed.abort();
          }, options.timeoutMs)
        : undefined;
      const callSignal = timed?.signal ?? signal;
      let completion: ChatCompletion;
      try {
        completion = await client.chat.completions.create(
          params,
          callSignal ? { signal: callSignal } : undefined,
        );
      } catch (err) {
        if (signal?.aborted) throw signal.reason;
        if (timedOut) {
          throw new ProviderError(name, {
            kind: 'timeout',
            message: `no complete answer within ${options.timeoutMs} ms`,
          });
        }
        throw new ProviderError(name, toFailure(err, options.apiKey));
      } finally {
        clearTimeout(handle);
        signal?.removeEventListener('abort', relay);
      }
      const response = fromOpenAICompletion(
        completion,
        Math.round(performance.now() - started),
        name,
      );
      checkPromptTokens(options, name, request, completion.usage);
      return response;
    },
    stream: (request, signal) => streamCompletion(client, options, name, request, signal),
  };
}

/**
 * The most characters one token is taken to cover when estimating the fewest tokens a prompt can
 * be. Tokenizers average about 4 characters per token on English prose and fewer on code and most
 * other languages; 6 is above what they reach on ordinary text, so `characters / 6` stays below
 * the true count (the chat template's own tokens only add to it) and an honest count is never
 * mistaken for a truncation. Long runs of one repeated character can tokenize more densely.
 */
export const MAX_CHARS_PER_TOKEN = 6;

/** Characters of text the model reads: the system prompt, message text, tool calls and results. */
function promptChars(request: LlmRequest): number {
  let chars = request.system?.length ?? 0;
  for (const m of request.messages) {
    if (typeof m.content === 'string') {
      chars += m.content.length;
      continue;
    }
    for (const part of m.content) {
      if (part.type === 'text') chars += part.text.length;
      else if (part.type === 'tool_result') chars += part.content.length;
      else if (part.type === 'tool_call') {
        chars += part.name.length + (JSON.stringify(part.input ?? {})?.length ?? 0);
      }
    }
  }
  return chars;
}

/** The fewest tokens the request's prompt can take (images count for nothing). */
export function minimumPromptTokens(request: LlmRequest): number {
  return Math.floor(promptChars(request) / MAX_CHARS_PER_TOKEN);
}

/**
 * The failure for an answer whose prompt the server cut to fit its window, or undefined when the
 * reported prompt size is plausible. The body carries `context_length_exceeded`, so the failure
 * classifies as `context_length`: only a tier with a larger window can answer.
 */
export function promptTruncationFailure(
  provider: string,
  request: LlmRequest,
  promptTokens: number,
  contextWindow?: number,
): ProviderFailure | undefined {
  const expected = minimumPromptTokens(request);
  const full = contextWindow !== undefined && promptTokens >= contextWindow;
  if (promptTokens >= expected && !full) return undefined;
  const fix =
    provider === 'ollama' ? 'raise OLLAMA_CONTEXT_LENGTH' : "raise the server's context length";
  const what = full
    ? `the prompt filled the whole context window (${promptTokens} of ${contextWindow} tokens), so the server truncated it`
    : `the server truncated the prompt to ${promptTokens} tokens (at least ${expected} expected)`;
  const message = `${what}; ${fix} or use a tier with a larger window`;
  return { message, body: { error: { code: 'context_length_exceeded', message } } };
}

/** Throws the truncation failure when the options ask for the check and the answer failed it. */
function checkPromptTokens(
  options: OpenAIProviderOptions,
  provider: string,
  request: LlmRequest,
  usage: CompletionUsage | undefined,
): void {
  // A server that reports no usage cannot be checked; one that does is checked every time.
  if (!options.detectTruncation || usage === undefined) return;
  const { contextWindow } = options.detectTruncation;
  const failure = promptTruncationFailure(provider, request, usage.prompt_tokens, contextWindow);
  if (failure) throw new ProviderError(provider, failure);
}

type ToolCallSoFar = { id: string; name: string; args: string };

/**
 * Rebuilds, from a stream's chunks, the completion the non-streaming call would have returned, so
 * that a streamed answer and a completed one translate through the same code.
 */
class CompletionAssembler {
  /** True once a chunk gave the choice its `finish_reason`. */
  finishReason: ChatCompletion.Choice['finish_reason'] | null = null;
  /** True once the `[DONE]` marker arrived: with a finish reason, the answer is whole. */
  sawDone = false;
  usage: CompletionUsage | undefined;
  private id = '';
  private created = 0;
  private model = '';
  private text = '';
  private refusal = '';
  private readonly tools = new Map<number, ToolCallSoFar>();

  /** Characters of text delivered so far, for the message of a cut stream. */
  get textChars(): number {
    return this.text.length + this.refusal.length;
  }

  /** Takes one chunk in; returns what the provider's stream yields for it. */
  apply(chunk: ChatCompletionChunk): ProviderStreamEvent[] {
    if (this.id === '') Object.assign(this, { id: chunk.id, created: chunk.created });
    if (this.model === '' && chunk.model) this.model = chunk.model;
    const out: ProviderStreamEvent[] = [];
    const choice = chunk.choices.find((c) => c.index === 0);
    if (choice) {
      const { delta } = choice;
      if (delta.content) {
        this.text += delta.content;
        out.push({ type: 'text', text: delta.content });
      }
      if (delta.refusal) {
        this.refusal += delta.refusal;
        out.push({ type: 'text', text: delta.refusal });
      }
      delta.tool_calls?.forEach((call, position) => this.addToolCall(call, position));
      if (choice.finish_reason) this.finishReason = choice.finish_reason;
    }
    if (chunk.usage) {
      this.usage = chunk.usage;
      out.push({ type: 'usage', usage: usageOf(chunk.usage) });
    }
    return out;
  }

  /** Tool calls arrive in pieces by index: the id and name first, the arguments in fragments. */
  private addToolCall(call: ChatCompletionChunk.Choice.Delta.ToolCall, position: number): void {
    // Some compatible servers send whole calls without an index; their order stands in for it.
    const index = typeof call.index === 'number' ? call.index : position;
    const soFar = this.tools.get(index) ?? { id: '', name: '', args: '' };
    if (call.id) soFar.id = call.id;
    if (call.function?.name) soFar.name += call.function.name;
    if (call.function?.arguments) soFar.args += call.function.arguments;
    this.tools.set(index, soFar);
  }

  /** The whole completion, in the shape `fromOpenAICompletion` reads. */
  completion(): ChatCompletion {
    const toolCalls = [...this.tools.entries()]
      .sort(([a], [b]) => a - b)
      .map(([, t]): ChatCompletionMessageFunctionToolCall => ({
        id: t.id,
        type: 'function',
        function: { name: t.name, arguments: t.args },
      }));
    const message: ChatCompletion.Choice['message'] = {
      role: 'assistant',
      content: this.text === '' ? null : this.text,
      refusal: this.refusal === '' ? null : this.refusal,
      ...(toolCalls.length ? { tool_calls: toolCalls } : {}),
    };
    return {
      id: this.id,
      object: 'chat.completion',
      created: this.created,
      model: this.model,
      choices: [{ index: 0, message, finish_reason: this.finishReason ?? 'stop', logprobs: null }],
      ...(this.usage ? { usage: this.usage } : {}),
    };
  }
}

function usageOf(usage: CompletionUsage): Partial<LlmUsage> {
  const out: Partial<LlmUsage> = {
    inputTokens: usage.prompt_tokens,
    outputTokens: usage.completion_tokens,
  };
  const cached = usage.prompt_tokens_details?.cached_tokens;
  if (cached !== undefined) out.cacheReadTokens = cached;
  return out;
}

/** One server-sent event's data as a chunk; an error event (or `{ error }` data) throws. */
function parseChunk(
  sse: { event: string | null; data: string },
  textChars: number,
  provider: string,
  apiKey: string,
): ChatCompletionChunk | undefined {
  if (sse.data.trim() === '') return undefined;
  const data = JSON.parse(sse.data) as unknown;
  if (sse.event === 'error' || (typeof data === 'object' && data !== null && 'error' in data)) {
    throw new ProviderError(provider, scrubSecrets(errorEventFailure(data, textChars), apiKey));
  }
  return data as ChatCompletionChunk;
}

/**
 * One streamed call: text as it arrives, usage when the server reports it, then the whole answer.
 * The answer is whole only with both a `finish_reason` and the `[DONE]` marker; a stream without
 * them throws a `truncated` failure instead. The raw events are read (with the SDK's own parser)
 * rather than the SDK's chunk iterator because that iterator hides whether `[DONE]` came.
 */
async function* streamCompletion(
  client: OpenAI,
  options: OpenAIProviderOptions,
  provider: string,
  request: LlmRequest,
  signal: AbortSignal | undefined,
): AsyncGenerator<ProviderStreamEvent> {
  if (signal?.aborted) throw abortReason(signal);
  const params = toOpenAIParams(request, options.model);
  const connectTimeout = options.connectTimeoutMs ?? options.timeoutMs;
  const started = performance.now();
  // A controller of its own, so that a consumer that stops reading also closes the connection.
  const local = new AbortController();
  const relay = () => local.abort(signal?.reason);
  signal?.addEventListener('abort', relay, { once: true });
  let drained = false;
  try {
    let body: Response;
    try {
      body = await client.chat.completions
        .create(
          { ...params, stream: true, stream_options: { include_usage: true } },
          {
            signal: local.signal,
            ...(connectTimeout === undefined ? {} : { timeout: connectTimeout }),
          },
        )
        .asResponse();
    } catch (err) {
      if (signal?.aborted) throw abortReason(signal);
      throw new ProviderError(provider, toFailure(err, options.apiKey));
    }
    const assembler = new CompletionAssembler();
    try {
      for await (const sse of _iterSSEMessages(body, local)) {
        // Nothing after the marker counts; the body is still read to its end.
        if (assembler.sawDone) continue;
        if (sse.data.startsWith('[DONE]')) {
          assembler.sawDone = true;
          continue;
        }
        const chunk = parseChunk(sse, assembler.textChars, provider, options.apiKey);
        if (chunk) yield* assembler.apply(chunk);
      }
      drained = true;
    } catch (err) {
      if (signal?.aborted) throw abortReason(signal);
      if (err instanceof ProviderError) throw err;
      const failure = midStreamFailure(err, assembler.textChars);
      throw new ProviderError(provider, scrubSecrets(failure, options.apiKey));
    }
    if (signal?.aborted) throw abortReason(signal);
    if (assembler.finishReason === null || !assembler.sawDone) {
      const missing = assembler.finishReason === null ? 'a finish_reason' : 'the [DONE] marker';
      throw new ProviderError(provider, truncatedFailure(assembler.textChars, missing));
    }
    const completion = assembler.completion();
    const response = fromOpenAICompletion(
      completion,
      Math.round(performance.now() - started),
      provider,
    );
    checkPromptTokens(options, provider, request, completion.usage);
    yield { type: 'done', response };
  } finally {
    signal?.removeEventListener('abort', relay);
    if (!drained) local.abort();
  }
}

/** The unified request as Chat Completions parameters. */
export function toOpenAIParams(
  request: LlmRequest,
  defaultModel: string,
): ChatCompletionCreateParamsNonStreaming {
  const messages: ChatCompletionMessageParam[] = [];
  if (request.system !== undefined) messages.push({ role: 'system', content: request.system });
  for (const m of request.messages) messages.push(...toMessages(m));
  const params: ChatCompletionCreateParamsNonStreaming = {
    model: request.model ?? defaultModel,
    messages,
    max_tokens: request.maxTokens,
  };
  if (request.tools?.length) {
    params.tools = request.tools.map((t) => ({
      type: 'function',
      function: {
        name: t.name,
        ...(t.description !== undefined ? { description: t.description } : {}),
        parameters: t.inputSchema,
      },
    }));
  }
  if (request.toolChoice !== undefined) params.tool_choice = toToolChoice(request.toolChoice);
  if (request.temperature !== undefined) params.temperature = request.temperature;
  if (request.stopSequences?.length) params.stop = request.stopSequences;
  if (request.json) params.response_format = { type: 'json_object' };
  return params;
}

function toToolChoice(choice: ToolChoice): ChatCompletionToolChoiceOption {
  return typeof choice === 'string'
    ? choice
    : { type: 'function', function: { name: choice.name } };
}

function toMessages(m: LlmMessage): ChatCompletionMessageParam[] {
  if (m.role === 'assistant') {
    if (typeof m.content === 'string') return [{ role: 'assistant', content: m.content }];
    const text = m.content.flatMap((p) => (p.type === 'text' ? [p.text] : [])).join('');
    const calls = m.content.flatMap((p) => (p.type === 'tool_call' ? [p] : []));
    if (!calls.length) return [{ role: 'assistant', content: text }];
    return [
      {
        role: 'assistant',
        content: text === '' ? null : text,
        tool_calls: calls.map((c) => ({
          id: c.id,
          type: 'function',
          function: { name: c.name, arguments: JSON.stringify(c.input ?? {}) },
        })),
      },
    ];
  }
  if (typeof m.content === 'string') return [{ role: 'user', content: m.content }];
  // Tool results become `tool` messages, which must directly follow the assistant's tool calls.
  const out: ChatCompletionMessageParam[] = [];
  const parts: ChatCompletionContentPart[] = [];
  for (const p of m.content) {
    if (p.type === 'tool_result') {
      out.push({
        role: 'tool',
        tool_call_id: p.toolCallId,
        content: p.isError ? `Error: ${p.content}` : p.content,
      });
    } else if (p.type === 'text') {
      parts.push({ type: 'text', text: p.text });
    } else {
      const url =
        p.source.kind === 'base64'
          ? `data:${p.source.mediaType};base64,${p.source.data}`
          : p.source.url;
      parts.push({ type: 'image_url', image_url: { url } });
    }
  }
  if (parts.length) out.push({ role: 'user', content: parts });
  return out;
}

const STOP_REASONS: Record<string, StopReason> = {
  stop: 'end',
  length: 'max_tokens',
  tool_calls: 'tool_use',
  function_call: 'tool_use',
  content_filter: 'refusal',
};

/** A Chat Completions answer as the unified response (tier and degraded left for the router). */
export function fromOpenAICompletion(
  completion: ChatCompletion,
  latencyMs: number,
  provider: string,
): LlmResponse {
  const choice = completion.choices[0];
  const message = choice?.message;
  const toolCalls = (message?.tool_calls ?? []).map((c) =>
    c.type === 'function'
      ? { id: c.id, name: c.function.name, input: parseArguments(c.function.arguments) }
      : { id: c.id, name: c.custom.name, input: { _raw: c.custom.input } },
  );
  let stopReason: StopReason = STOP_REASONS[choice?.finish_reason ?? ''] ?? 'other';
  if (message?.refusal && !message.content) stopReason = 'refusal';
  const usage: LlmResponse['usage'] = {
    inputTokens: completion.usage?.prompt_tokens ?? 0,
    outputTokens: completion.usage?.completion_tokens ?? 0,
  };
  const cached = completion.usage?.prompt_tokens_details?.cached_tokens;
  if (cached !== undefined) usage.cacheReadTokens = cached;
  return {
    text: message?.content ?? message?.refusal ?? '',
    toolCalls,
    stopReason,
    usage,
    provider,
    model: completion.model,
    tier: '',
    degraded: false,
    latencyMs,
  };
}

function parseArguments(raw: string): unknown {
  if (raw.trim() === '') return {};
  try {
    return JSON.parse(raw) as unknown;
  } catch {
    return { _raw: raw };
  }
}

/** What the SDK's error says about the wire, with the key scrubbed from every string. */
function toFailure(err: unknown, apiKey: string): ProviderFailure {
  const failure: ProviderFailure = { message: 'request failed' };
  if (err instanceof APIError) {
    const api = err as APIError;
    failure.message = api.message;
    const status: number | undefined = api.status;
    if (status !== undefined) failure.status = status;
    // The SDK keeps the body's `error` member only; an OpenAI error body is `{ error }`.
    const body: unknown = api.error;
    if (body !== undefined) failure.body = { error: body };
    const headers = plainHeaders(api.headers);
    if (headers) failure.headers = headers;
    if (err instanceof APIConnectionTimeoutError) {
      failure.kind = 'timeout';
    } else if (status === undefined) {
      failure.kind = 'network';
      const code = networkCode(err);
      if (code) failure.code = code;
    }
  } else if (err instanceof Error) {
    failure.message = err.message;
  } else {
    failure.message = String(err);
  }
  return scrubSecrets(failure, apiKey);
}
