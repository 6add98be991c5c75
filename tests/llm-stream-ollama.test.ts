/**
 * Ollama through the OpenAI adapter: a prompt the server silently cut to its context window is a
 * `context_length` failure (for complete() and for stream()), and Ollama's own error bodies
 * classify as they should. The real `openai` SDK talks to the fake Chat Completions server.
 */
import { afterAll, afterEach, beforeAll, beforeEach, describe, expect, it } from 'vitest';
import {
  MAX_CHARS_PER_TOKEN,
  minimumPromptTokens,
  openaiProvider,
  presetOptions,
  promptTruncationFailure,
  ProviderError,
  type OpenAIProvider,
} from '../adapters/llm/openai.ts';
import { classifyFailure } from '../engine/llm/classify.ts';
import type { LlmRequest, ProviderStreamEvent } from '../engine/llm/types.ts';
import { startFakeOpenAI, type FakeOpenAI } from './support/fake-openai.ts';

type Outcome = { events: ProviderStreamEvent[]; error?: unknown };

async function drain(stream: AsyncIterable<ProviderStreamEvent>): Promise<Outcome> {
  const events: ProviderStreamEvent[] = [];
  try {
    for await (const event of stream) events.push(event);
  } catch (error) {
    return { events, error };
  }
  return { events };
}

async function caught(p: Promise<unknown>): Promise<ProviderError> {
  try {
    await p;
  } catch (err) {
    if (err instanceof ProviderError) return err;
    throw err;
  }
  throw new Error('expected a ProviderError');
}

/** A request whose text is exactly `chars` characters: a system prompt of 600 and the rest asked. */
function requestOf(chars: number): LlmRequest {
  return {
    system: 's'.repeat(600),
    messages: [{ role: 'user', content: 'word '.repeat((chars - 600) / 5) }],
    maxTokens: 100,
  };
}

const unhandled: unknown[] = [];
const onUnhandled = (reason: unknown) => unhandled.push(reason);
beforeAll(() => {
  process.on('unhandledRejection', onUnhandled);
});
afterAll(() => {
  process.off('unhandledRejection', onUnhandled);
});
afterEach(async () => {
  await new Promise((resolve) => setTimeout(resolve, 30));
  expect(unhandled).toEqual([]);
});

describe('the prompt size estimate', () => {
  it('counts system, message text, tool calls and tool results at 6 characters a token', () => {
    expect(MAX_CHARS_PER_TOKEN).toBe(6);
    const request: LlmRequest = {
      system: 'x'.repeat(60),
      maxTokens: 10,
      messages: [
        { role: 'user', content: 'y'.repeat(120) },
        {
          role: 'assistant',
          content: [
            { type: 'text', text: 'z'.repeat(30) },
            // 'lookup' (6) + '{"q":"abcdefghijkl"}' (20)
            { type: 'tool_call', id: 'c1', name: 'lookup', input: { q: 'abcdefghijkl' } },
          ],
        },
        {
          role: 'user',
          content: [
            { type: 'tool_result', toolCallId: 'c1', content: 'r'.repeat(40) },
            { type: 'image', source: { kind: 'url', url: 'http://127.0.0.1/big.png' } },
          ],
        },
      ],
    };
    // 60 + 120 + 30 + 26 + 40 = 276 characters → 46 tokens at the least.
    expect(minimumPromptTokens(request)).toBe(46);
    expect(minimumPromptTokens({ messages: [{ role: 'user', content: 'hi' }], maxTokens: 1 })).toBe(
      0,
    );
  });

  it('a reported count below the estimate, or one that fills the window, is a context_length failure', () => {
    const request = requestOf(6000);
    expect(minimumPromptTokens(request)).toBe(1000);
    expect(promptTruncationFailure('ollama', request, 1000)).toBeUndefined();
    expect(promptTruncationFailure('ollama', request, 4000, 4096)).toBeUndefined();

    const cut = promptTruncationFailure('ollama', request, 999);
    const message =
      'the server truncated the prompt to 999 tokens (at least 1000 expected); raise OLLAMA_CONTEXT_LENGTH or use a tier with a larger window';
    expect(cut).toEqual({ message, body: { error: { code: 'context_length_exceeded', message } } });
    expect(classifyFailure(cut!)).toEqual({
      class: 'context_length',
      reason: 'context_length_exceeded in stream',
    });

    const full = promptTruncationFailure('local', request, 4096, 4096);
    expect(full?.message).toBe(
      "the prompt filled the whole context window (4096 of 4096 tokens), so the server truncated it; raise the server's context length or use a tier with a larger window",
    );
    expect(classifyFailure(full!).class).toBe('context_length');
  });
});

describe('presets', () => {
  it('the ollama preset turns truncation detection on; the others leave it off', () => {
    expect(presetOptions('ollama', 'llama3.2', {})).toEqual({
      apiKey: 'ollama',
      baseURL: 'http://127.0.0.1:11434/v1',
      model: 'llama3.2',
      name: 'ollama',
      detectTruncation: {},
    });
    expect(presetOptions('lmstudio', 'qwen', {}).detectTruncation).toBeUndefined();
    expect(presetOptions('xai', 'grok', { XAI_API_KEY: 'k' }).detectTruncation).toBeUndefined();
  });

  it('a context window or connect timeout that is not a positive number is refused clearly', () => {
    const base = { apiKey: 'ollama', baseURL: 'http://127.0.0.1:9/v1', model: 'm' };
    expect(() => openaiProvider({ ...base, detectTruncation: { contextWindow: 0 } })).toThrow(
      'detectTruncation.contextWindow must be a positive number of tokens, got 0',
    );
    expect(() => openaiProvider({ ...base, connectTimeoutMs: Number.NaN })).toThrow(
      'connectTimeoutMs must be a positive number of milliseconds, got NaN',
    );
  });
});

describe('ollama against the fake server', () => {
  let fake: FakeOpenAI;
  beforeAll(async () => {
    fake = await startFakeOpenAI();
  });
  afterAll(async () => {
    await fake.close();
  });
  beforeEach(() => {
    fake.requests.length = 0;
  });

  /** The ollama preset, pointed at the fake. */
  const ollama = (extra: { contextWindow?: number } = {}): OpenAIProvider =>
    openaiProvider({
      ...presetOptions('ollama', 'llama3.2', {}),
      baseURL: fake.url,
      ...(extra.contextWindow === undefined
        ? {}
        : { detectTruncation: { contextWindow: extra.contextWindow } }),
    });

  const EXPECTED_MESSAGE =
    'the server truncated the prompt to 512 tokens (at least 1000 expected); raise OLLAMA_CONTEXT_LENGTH or use a tier with a larger window';

  it('complete(): a confident answer to a prompt cut to 512 tokens is a context_length failure', async () => {
    fake.script({
      text: 'A confident summary.',
      usage: { promptTokens: 512, completionTokens: 4 },
    });
    const err = await caught(ollama().complete(requestOf(6000)));
    expect(err.message).toBe(`ollama: ${EXPECTED_MESSAGE}`);
    expect(err.failure).toEqual({
      message: EXPECTED_MESSAGE,
      body: { error: { code: 'context_length_exceeded', message: EXPECTED_MESSAGE } },
    });
    expect(classifyFailure(err.failure).class).toBe('context_length');
    expect(fake.requests.length).toBe(1);
  });

  it('stream(): the text arrives, then the same failure instead of done', async () => {
    fake.script({
      text: 'A confident summary.',
      usage: { promptTokens: 512, completionTokens: 4 },
    });
    const { events, error } = await drain(ollama().stream(requestOf(6000)));
    expect(events).toEqual([
      { type: 'text', text: 'A ' },
      { type: 'text', text: 'confident ' },
      { type: 'text', text: 'summary.' },
      { type: 'usage', usage: { inputTokens: 512, outputTokens: 4 } },
    ]);
    expect(error).toBeInstanceOf(ProviderError);
    const failure = (error as ProviderError).failure;
    expect(failure.message).toBe(EXPECTED_MESSAGE);
    expect(classifyFailure(failure).class).toBe('context_length');
  });

  it('a prompt count at or above the estimate is answered as usual, streamed or not', async () => {
    fake.script(
      { text: 'Fine.', usage: { promptTokens: 1000, completionTokens: 2 } },
      { text: 'Fine.', usage: { promptTokens: 1400, completionTokens: 2 } },
    );
    const completed = await ollama().complete(requestOf(6000));
    expect([completed.text, completed.provider, completed.usage]).toEqual([
      'Fine.',
      'ollama',
      { inputTokens: 1000, outputTokens: 2 },
    ]);
    const { events, error } = await drain(ollama().stream(requestOf(6000)));
    expect(error).toBeUndefined();
    const done = events.at(-1);
    expect(done?.type === 'done' ? done.response.usage : undefined).toEqual({
      inputTokens: 1400,
      outputTokens: 2,
    });
  });

  it('with a contextWindow, a prompt that fills it is a failure and one just below is not', async () => {
    fake.script(
      { text: 'Cut.', usage: { promptTokens: 2048, completionTokens: 2 } },
      { text: 'Whole.', usage: { promptTokens: 2047, completionTokens: 2 } },
    );
    const err = await caught(ollama({ contextWindow: 2048 }).complete(requestOf(1200)));
    expect(err.failure.message).toBe(
      'the prompt filled the whole context window (2048 of 2048 tokens), so the server truncated it; raise OLLAMA_CONTEXT_LENGTH or use a tier with a larger window',
    );
    expect(classifyFailure(err.failure).class).toBe('context_length');
    const res = await ollama({ contextWindow: 2048 }).complete(requestOf(1200));
    expect(res.text).toBe('Whole.');
  });

  it('without detectTruncation the same answer comes back unchecked', async () => {
    fake.script({ text: 'Unchecked.', usage: { promptTokens: 512, completionTokens: 2 } });
    const plain = openaiProvider({ apiKey: 'ollama', baseURL: fake.url, model: 'llama3.2' });
    const res = await plain.complete(requestOf(6000));
    expect([res.text, res.usage.inputTokens]).toEqual(['Unchecked.', 512]);
  });

  const notPulled = {
    error: {
      message: 'model "x" not found, try pulling it first',
      type: 'api_error',
      param: null,
      code: null,
    },
  };
  const noTools = {
    error: {
      message: 'registry.ollama.ai/library/x does not support tools',
      type: 'api_error',
      param: null,
      code: null,
    },
  };
  const withTools: LlmRequest = {
    messages: [{ role: 'user', content: 'weather?' }],
    maxTokens: 20,
    model: 'x',
    tools: [{ name: 'weather', inputSchema: { type: 'object' } }],
  };

  it('a 404 for a model not pulled is not_found, for complete() and stream()', async () => {
    fake.script({ status: 404, rawBody: notPulled }, { status: 404, rawBody: notPulled });
    const viaComplete = await caught(ollama().complete({ ...withTools, tools: undefined }));
    const streamed = await drain(ollama().stream({ ...withTools, tools: undefined }));
    expect(streamed.events).toEqual([]);
    const viaStream = streamed.error as ProviderError;
    for (const err of [viaComplete, viaStream]) {
      expect(err.failure.status).toBe(404);
      expect(err.failure.body).toEqual(notPulled);
      expect(classifyFailure(err.failure)).toEqual({ class: 'not_found', reason: '404 api_error' });
    }
    expect(fake.requests.length).toBe(2);
  });

  it('a 400 for tools on a model without tool support is bad_request, for complete() and stream()', async () => {
    fake.script({ status: 400, rawBody: noTools }, { status: 400, rawBody: noTools });
    const viaComplete = await caught(ollama().complete(withTools));
    const streamed = await drain(ollama().stream(withTools));
    const viaStream = streamed.error as ProviderError;
    for (const err of [viaComplete, viaStream]) {
      expect(err.failure.status).toBe(400);
      expect(err.failure.body).toEqual(noTools);
      expect(err.message).toBe('ollama: 400 registry.ollama.ai/library/x does not support tools');
      expect(classifyFailure(err.failure)).toEqual({
        class: 'bad_request',
        reason: '400 api_error',
      });
    }
    expect(fake.requests.length).toBe(2);
  });
});
