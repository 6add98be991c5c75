/**
 * The Anthropic provider: translates keel's unified LLM request and response to and from the
 * Messages API, and turns SDK errors into plain `ProviderError`s that carry no SDK types and no key.
 */
import { ProviderError, networkCode, plainHeaders, scrubSecrets } from './provider-error.ts';
import Anthropic from '@anthropic-ai/sdk';
import type {
  ContentBlockParam,
  MessageCreateParamsNonStreaming,
  MessageParam,
  Tool,
  ToolChoice as AnthropicToolChoice,
} from '@anthropic-ai/sdk/resources/messages/messages';
import type {
  LlmMessage,
  LlmRequest,
  LlmResponse,
  ProviderFailure,
  StopReason,
  ToolChoice,
} from '../../engine/llm/types.ts';

/** A provider failure with the wire details in `failure`. */

export { ProviderError };

export type AnthropicProviderOptions = {
  apiKey: string;
  baseURL: string;
  model: string;
  timeoutMs?: number;
};

export type AnthropicProvider = {
  name: 'anthropic';
  model: string;
  complete(request: LlmRequest, signal?: AbortSignal): Promise<LlmResponse>;
};

/** The instruction added to the system prompt when a JSON answer is asked for. */
export const JSON_INSTRUCTION =
  'Answer with a single JSON object and nothing else: no prose, no code fences.';

/** The subset of an Anthropic `Message` that the translation reads. */
export type AnthropicMessageLike = {
  model: string;
  content: readonly ({ type: string } & Record<string, unknown>)[];
  stop_reason: string | null;
  usage: {
    input_tokens: number;
    output_tokens: number;
    cache_read_input_tokens?: number | null;
    cache_creation_input_tokens?: number | null;
  };
};

function toContent(message: LlmMessage): string | ContentBlockParam[] {
  if (typeof message.content === 'string') return message.content;
  return message.content.map((part): ContentBlockParam => {
    switch (part.type) {
      case 'text':
        return { type: 'text', text: part.text };
      case 'image':
        return part.source.kind === 'base64'
          ? {
              type: 'image',
              source: {
                type: 'base64',
                media_type: part.source.mediaType as 'image/png',
                data: part.source.data,
              },
            }
          : { type: 'image', source: { type: 'url', url: part.source.url } };
      case 'tool_call':
        return { type: 'tool_use', id: part.id, name: part.name, input: part.input };
      case 'tool_result':
        return {
          type: 'tool_result',
          tool_use_id: part.toolCallId,
          content: part.content,
          ...(part.isError === undefined ? {} : { is_error: part.isError }),
        };
    }
  });
}

function toToolChoice(choice: ToolChoice): AnthropicToolChoice {
  if (choice === 'auto') return { type: 'auto' };
  if (choice === 'none') return { type: 'none' };
  if (choice === 'required') return { type: 'any' };
  return { type: 'tool', name: choice.name };
}

/**
 * The Messages API parameters keel sends. `temperature` is still accepted on the wire but no
 * longer declared by the SDK's parameter type, so it is added here.
 */
export type AnthropicParams = MessageCreateParamsNonStreaming & { temperature?: number };

/** Unified request → Messages API parameters (non-streaming). */
export function toAnthropicParams(request: LlmRequest, defaultModel: string): AnthropicParams {
  const params: AnthropicParams = {
    model: request.model ?? defaultModel,
    max_tokens: request.maxTokens,
    messages: request.messages.map((m): MessageParam => ({ role: m.role, content: toContent(m) })),
  };
  const system = request.json
    ? request.system
      ? `${request.system}\n\n${JSON_INSTRUCTION}`
      : JSON_INSTRUCTION
    : request.system;
  if (system !== undefined) params.system = system;
  if (request.tools !== undefined) {
    params.tools = request.tools.map((t): Tool => ({
      name: t.name,
      ...(t.description === undefined ? {} : { description: t.description }),
      input_schema: t.inputSchema as Tool['input_schema'],
    }));
  }
  if (request.toolChoice !== undefined) params.tool_choice = toToolChoice(request.toolChoice);
  if (request.temperature !== undefined) params.temperature = request.temperature;
  if (request.stopSequences !== undefined) params.stop_sequences = request.stopSequences;
  return params;
}

function toStopReason(reason: string | null): StopReason {
  switch (reason) {
    case 'end_turn':
      return 'end';
    case 'max_tokens':
      return 'max_tokens';
    case 'stop_sequence':
      return 'stop_sequence';
    case 'tool_use':
      return 'tool_use';
    case 'refusal':
      return 'refusal';
    default:
      return 'other';
  }
}

const FENCE = /^\s*```[A-Za-z0-9_-]*\s*\n([\s\S]*?)\n?\s*```\s*$/;

/** Strips one surrounding Markdown code fence, if the whole answer is fenced. */
export function stripJsonFence(text: string): string {
  const match = FENCE.exec(text);
  return match ? (match[1] ?? '').trim() : text;
}

/**
 * Messages API answer → unified response (tier '' and degraded false: the router sets those). With
 * `json`, a fenced answer is unwrapped.
 */
export function fromAnthropicMessage(
  message: AnthropicMessageLike,
  latencyMs: number,
  options: { json?: boolean } = {},
): LlmResponse {
  let text = '';
  const toolCalls: LlmResponse['toolCalls'] = [];
  for (const block of message.content) {
    if (block.type === 'text' && typeof block.text === 'string') text += block.text;
    else if (block.type === 'tool_use') {
      toolCalls.push({ id: String(block.id), name: String(block.name), input: block.input });
    }
  }
  if (options.json) text = stripJsonFence(text);
  const u = message.usage;
  return {
    text,
    toolCalls,
    stopReason: toStopReason(message.stop_reason),
    usage: {
      inputTokens: u.input_tokens,
      outputTokens: u.output_tokens,
      ...(u.cache_read_input_tokens == null ? {} : { cacheReadTokens: u.cache_read_input_tokens }),
      ...(u.cache_creation_input_tokens == null
        ? {}
        : { cacheWriteTokens: u.cache_creation_input_tokens }),
    },
    provider: 'anthropic',
    model: message.model,
    tier: '',
    degraded: false,
    latencyMs,
  };
}

/** Any error from the SDK (or fetch under it) → a ProviderFailure with no key in it. */
export function toProviderFailure(err: unknown, apiKey: string): ProviderFailure {
  return scrubSecrets(describeFailure(err), apiKey);
}

function describeFailure(err: unknown): ProviderFailure {
  const message = err instanceof Error ? err.message : String(err);
  if (err instanceof Anthropic.APIUserAbortError) {
    return { kind: 'network', code: 'ABORT_ERR', message };
  }
  if (err instanceof Anthropic.APIConnectionTimeoutError) {
    return { kind: 'timeout', message };
  }
  if (err instanceof Anthropic.APIError && !(err instanceof Anthropic.APIConnectionError)) {
    const failure: ProviderFailure = { message };
    if (typeof err.status === 'number') failure.status = err.status;
    if (err.error !== undefined) failure.body = err.error;
    const headers = plainHeaders(err.headers);
    if (headers) failure.headers = headers;
    return failure;
  }
  const code = networkCode(err);
  return { kind: 'network', ...(code === undefined ? {} : { code }), message };
}

export function anthropicProvider(options: AnthropicProviderOptions): AnthropicProvider {
  const client = new Anthropic({
    apiKey: options.apiKey,
    baseURL: options.baseURL,
    maxRetries: 0,
    ...(options.timeoutMs === undefined ? {} : { timeout: options.timeoutMs }),
  });
  return {
    name: 'anthropic',
    model: options.model,
    async complete(request, signal) {
      const params = toAnthropicParams(request, options.model);
      const started = performance.now();
      try {
        const message = await client.messages.create(params, signal ? { signal } : undefined);
        const latencyMs = Math.round(performance.now() - started);
        return fromAnthropicMessage(message as unknown as AnthropicMessageLike, latencyMs, {
          json: request.json === true,
        });
      } catch (err) {
        throw new ProviderError('anthropic', toProviderFailure(err, options.apiKey));
      }
    },
  };
}
