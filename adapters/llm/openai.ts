/**
 * The OpenAI Chat Completions adapter, over the official `openai` SDK. It also serves every
 * OpenAI-compatible server (Ollama, LM Studio, llama.cpp, vLLM) and the hosted providers with an
 * OpenAI-compatible endpoint, through `PRESETS`.
 */
import { ProviderError, networkCode, plainHeaders, scrubSecrets } from './provider-error.ts';
import OpenAI, { APIConnectionTimeoutError, APIError } from 'openai';
import type {
  ChatCompletion,
  ChatCompletionContentPart,
  ChatCompletionCreateParamsNonStreaming,
  ChatCompletionMessageParam,
  ChatCompletionToolChoiceOption,
} from 'openai/resources/chat/completions';
import type {
  LlmMessage,
  LlmRequest,
  LlmResponse,
  ProviderFailure,
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
  /** The SDK's whole-request timeout. */
  timeoutMs?: number;
};

export type OpenAIProvider = {
  name: string;
  model: string;
  complete(request: LlmRequest, signal?: AbortSignal): Promise<LlmResponse>;
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
  return { apiKey, baseURL: p.baseURL, model, name: preset };
}

export function openaiProvider(options: OpenAIProviderOptions): OpenAIProvider {
  const name = options.name ?? 'openai';
  const client = new OpenAI({
    apiKey: options.apiKey,
    baseURL: options.baseURL,
    maxRetries: 0,
    ...(options.timeoutMs !== undefined ? { timeout: options.timeoutMs } : {}),
  });
  return {
    name,
    model: options.model,
    async complete(request, signal) {
      const params = toOpenAIParams(request, options.model);
      const started = performance.now();
      // The SDK's own timeout stops at the response headers; a body that never comes would hang,
      // so the whole call runs under a timer of its own.
      const timer = new AbortController();
      const handle =
        options.timeoutMs !== undefined
          ? setTimeout(() => timer.abort(), options.timeoutMs)
          : undefined;
      const signals = signal ? [signal, timer.signal] : [timer.signal];
      let completion: ChatCompletion;
      try {
        completion = await client.chat.completions.create(params, {
          signal: AbortSignal.any(signals),
        });
      } catch (err) {
        if (signal?.aborted) throw signal.reason;
        if (timer.signal.aborted) {
          throw new ProviderError(name, {
            kind: 'timeout',
            message: `no complete answer within ${options.timeoutMs} ms`,
          });
        }
        throw new ProviderError(name, toFailure(err, options.apiKey));
      } finally {
        clearTimeout(handle);
      }
      return fromOpenAICompletion(completion, performance.now() - started, name);
    },
  };
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
