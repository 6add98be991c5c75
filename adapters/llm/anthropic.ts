/**
 * The Anthropic provider: translates keel's unified LLM request and response to and from the
 * Messages API, and turns SDK errors into plain `ProviderError`s that carry no SDK types and no key.
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
import type Anthropic from '@anthropic-ai/sdk';
import type {
  ContentBlockParam,
  MessageCreateParamsNonStreaming,
  MessageParam,
  RawMessageStreamEvent,
  Tool,
  ToolChoice as AnthropicToolChoice,
} from '@anthropic-ai/sdk/resources/messages/messages';
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

/** A provider failure with the wire details in `failure`. */

export { ProviderError };

type AnthropicSdk = typeof import('@anthropic-ai/sdk').default;

/**
 * The SDK, loaded on the first call: it takes about half a second to load, which every `keel`
 * command would otherwise pay, whether or not it calls a model. Errors are classified only after a
 * call, so by then it is here.
 */
let sdk: AnthropicSdk | undefined;

async function loadSdk(): Promise<AnthropicSdk> {
  sdk ??= (await import('@anthropic-ai/sdk')).default;
  return sdk;
}

export type AnthropicProviderOptions = {
  apiKey: string;
  baseURL: string;
  model: string;
  /**
   * `complete()`: the SDK's timeout, which lasts until the response headers; a non-streaming
   * answer sends them only once it is whole, so this bounds the whole call.
   */
  timeoutMs?: number;
  /**
   * `stream()`: how long to wait for the response headers (`timeoutMs` when omitted). Once the
   * stream has started no timer here cuts it: time-to-first-token and idle limits are the
   * caller's, through the abort signal.
   */
  connectTimeoutMs?: number;
};

export type AnthropicProvider = LlmProvider & {
  name: 'anthropic';
  stream(request: LlmRequest, signal?: AbortSignal): AsyncIterable<ProviderStreamEvent>;
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
  const Anthropic = sdk;
  if (!Anthropic) {
    const code = networkCode(err);
    return { kind: 'network', ...(code === undefined ? {} : { code }), message };
  }
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

type AssembledBlock =
  | { type: 'text'; text: string }
  | { type: 'tool_use'; id: string; name: string; input: unknown; json: string };

/** Message usage fields that a stream event carries, where each may be absent or null. */
type WireUsage = {
  input_tokens?: number | null;
  output_tokens?: number | null;
  cache_read_input_tokens?: number | null;
  cache_creation_input_tokens?: number | null;
};

/** The unified names of the usage fields an event reported (nulls and absences left out). */
function usageOf(u: WireUsage): Partial<LlmUsage> {
  const out: Partial<LlmUsage> = {};
  if (u.input_tokens != null) out.inputTokens = u.input_tokens;
  if (u.output_tokens != null) out.outputTokens = u.output_tokens;
  if (u.cache_read_input_tokens != null) out.cacheReadTokens = u.cache_read_input_tokens;
  if (u.cache_creation_input_tokens != null) out.cacheWriteTokens = u.cache_creation_input_tokens;
  return out;
}

/** Tool input from its streamed JSON; unparseable input is kept raw rather than lost. */
function parseToolInput(block: Extract<AssembledBlock, { type: 'tool_use' }>): unknown {
  if (block.json.trim() === '') return block.input;
  try {
    return JSON.parse(block.json) as unknown;
  } catch {
    return { _raw: block.json };
  }
}

/**
 * Rebuilds, from a stream's raw events, the message the non-streaming call would have returned,
 * so that a streamed answer and a completed one translate through the same code.
 */
class MessageAssembler {
  model = '';
  stopReason: string | null = null;
  /** True once `message_stop` arrived: only then is the answer whole. */
  stopped = false;
  /** Characters of text delivered so far, for the message of a cut stream. */
  textChars = 0;
  private readonly usage: WireUsage = {};
  private readonly blocks = new Map<number, AssembledBlock>();

  /** Takes one event in; returns what the provider's stream yields for it. */
  apply(event: RawMessageStreamEvent): ProviderStreamEvent[] {
    switch (event.type) {
      case 'message_start': {
        this.model = event.message.model;
        Object.assign(this.usage, event.message.usage);
        const { output_tokens: _ignored, ...input } = event.message.usage;
        return [{ type: 'usage', usage: usageOf(input) }];
      }
      case 'content_block_start': {
        const block = event.content_block;
        if (block.type === 'text') {
          this.blocks.set(event.index, { type: 'text', text: '' });
          return this.text(event.index, block.text);
        }
        if (block.type === 'tool_use') {
          const { id, name, input } = block;
          this.blocks.set(event.index, { type: 'tool_use', id, name, input, json: '' });
        }
        return [];
      }
      case 'content_block_delta': {
        const { delta } = event;
        if (delta.type === 'text_delta') return this.text(event.index, delta.text);
        const block = this.blocks.get(event.index);
        if (delta.type === 'input_json_delta' && block?.type === 'tool_use') {
          block.json += delta.partial_json;
        }
        return [];
      }
      case 'message_delta': {
        this.stopReason = event.delta.stop_reason;
        const reported = Object.entries(event.usage).filter(([, v]) => v != null);
        Object.assign(this.usage, Object.fromEntries(reported));
        return [{ type: 'usage', usage: usageOf(event.usage) }];
      }
      case 'message_stop':
        this.stopped = true;
        return [];
      default:
        return [];
    }
  }

  private text(index: number, text: string): ProviderStreamEvent[] {
    const block = this.blocks.get(index);
    if (text === '' || block?.type !== 'text') return [];
    block.text += text;
    this.textChars += text.length;
    return [{ type: 'text', text }];
  }

  /** The whole message, in the shape `fromAnthropicMessage` reads. */
  message(): AnthropicMessageLike {
    const content = [...this.blocks.entries()]
      .sort(([a], [b]) => a - b)
      .map(([, block]) =>
        block.type === 'text'
          ? { type: 'text', text: block.text }
          : { type: 'tool_use', id: block.id, name: block.name, input: parseToolInput(block) },
      );
    return {
      model: this.model,
      content,
      stop_reason: this.stopReason,
      usage: {
        ...this.usage,
        input_tokens: this.usage.input_tokens ?? 0,
        output_tokens: this.usage.output_tokens ?? 0,
      },
    };
  }
}

/** What went wrong while reading a stream: an error event, or the connection. */
function streamFailure(err: unknown, textChars: number, apiKey: string): ProviderFailure {
  const Anthropic = sdk;
  const failure =
    Anthropic && err instanceof Anthropic.APIError && !(err instanceof Anthropic.APIConnectionError)
      ? errorEventFailure(err.error, textChars)
      : midStreamFailure(err, textChars);
  return scrubSecrets(failure, apiKey);
}

/**
 * One streamed call: text as it arrives, usage from `message_start` (and the final count from
 * `message_delta`), then the whole answer. A stream that ends without `message_stop` throws a
 * `truncated` failure instead of an answer; an abort rethrows the signal's reason.
 */
async function* streamMessage(
  client: () => Promise<Anthropic>,
  options: AnthropicProviderOptions,
  request: LlmRequest,
  signal: AbortSignal | undefined,
): AsyncGenerator<ProviderStreamEvent> {
  if (signal?.aborted) throw abortReason(signal);
  const params = toAnthropicParams(request, options.model);
  const connectTimeout = options.connectTimeoutMs ?? options.timeoutMs;
  const started = performance.now();
  let events: AsyncIterable<RawMessageStreamEvent>;
  try {
    events = await (
      await client()
    ).messages.create(
      { ...params, stream: true },
      {
        ...(signal ? { signal } : {}),
        ...(connectTimeout === undefined ? {} : { timeout: connectTimeout }),
      },
    );
  } catch (err) {
    if (signal?.aborted) throw abortReason(signal);
    throw new ProviderError('anthropic', toProviderFailure(err, options.apiKey));
  }
  const assembler = new MessageAssembler();
  try {
    // The SDK ends its iteration quietly when the request is aborted; the checks below say why.
    for await (const event of events) yield* assembler.apply(event);
  } catch (err) {
    if (signal?.aborted) throw abortReason(signal);
    throw new ProviderError('anthropic', streamFailure(err, assembler.textChars, options.apiKey));
  }
  if (signal?.aborted) throw abortReason(signal);
  if (!assembler.stopped) {
    throw new ProviderError('anthropic', truncatedFailure(assembler.textChars, 'message_stop'));
  }
  const latencyMs = Math.round(performance.now() - started);
  yield {
    type: 'done',
    response: fromAnthropicMessage(assembler.message(), latencyMs, { json: request.json === true }),
  };
}

export function anthropicProvider(options: AnthropicProviderOptions): AnthropicProvider {
  requirePositive('connectTimeoutMs', options.connectTimeoutMs, 'milliseconds');
  let made: Promise<Anthropic> | undefined;
  const client = () =>
    (made ??= loadSdk().then(
      (Anthropic) =>
        new Anthropic({
          apiKey: options.apiKey,
          baseURL: options.baseURL,
          maxRetries: 0,
          // The SDK's own debug log (ANTHROPIC_LOG / OPENAI_LOG) prints error bodies, which may echo
          // the key: keel reports failures itself, scrubbed.
          logLevel: 'off',
          ...(options.timeoutMs === undefined ? {} : { timeout: options.timeoutMs }),
        }),
    ));
  return {
    name: 'anthropic',
    model: options.model,
    stream: (request, signal) => streamMessage(client, options, request, signal),
    async complete(request, signal) {
      const params = toAnthropicParams(request, options.model);
      const started = performance.now();
      try {
        const message = await (
          await client()
        ).messages.create(params, signal ? { signal } : undefined);
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
