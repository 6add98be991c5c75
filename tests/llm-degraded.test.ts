import { describe, expect, it } from 'vitest';
import { classifyFailure } from '../engine/llm/classify.ts';
import {
  degradedProvider,
  DegradedTierError,
  deltasOf,
  salientTerms,
  splitIntoSentences,
} from '../engine/llm/degraded.ts';
import { createRouter, LlmUnavailableError } from '../engine/llm/router.ts';
import type { LlmRequest, ProviderStreamEvent } from '../engine/llm/types.ts';
import { systemClock } from '../engine/time.ts';

const NOTES =
  'Notes follow.\n\n' +
  'A lease gives one worker the run for a while. Workers renew the lease before it expires. ' +
  'The cafeteria opens at nine in the morning. When a lease expires, another worker may take ' +
  'the run over.\n\n' +
  '- Two workers never hold the same lease at once.';

const TOOL_OUTPUT =
  'The database keeps every checkpoint. Stale workers stop when their lease is lost. ' +
  'A lease gives one worker the run for a while.';

/** A conversation about leases: notes, an assistant turn, then a tool result and the question. */
function request(maxTokens: number, extra: Partial<LlmRequest> = {}): LlmRequest {
  return {
    system: 'Answer from the notes.',
    maxTokens,
    messages: [
      { role: 'user', content: [{ type: 'text', text: NOTES }] },
      { role: 'assistant', content: 'Anything else?' },
      {
        role: 'user',
        content: [
          { type: 'tool_result', toolCallId: 't1', content: TOOL_OUTPUT },
          { type: 'text', text: 'How do leases stop two workers?' },
        ],
      },
    ],
    ...extra,
  };
}

/** A clock that reads 1000, then 1007, then 1014, ... */
function steppingClock() {
  let t = 993;
  return { now: () => (t += 7) };
}

const EVERY_MATCH =
  'A lease gives one worker the run for a while. Workers renew the lease before it expires. ' +
  'When a lease expires, another worker may take the run over. ' +
  'Two workers never hold the same lease at once. Stale workers stop when their lease is lost.';

async function refusal(p: Promise<unknown>): Promise<DegradedTierError> {
  try {
    await p;
  } catch (err) {
    if (err instanceof DegradedTierError) return err;
    throw err;
  }
  throw new Error('expected the degraded tier to refuse');
}

describe('text rules', () => {
  it('salient terms come from the system prompt and the last user text, stemmed, no stopwords', () => {
    expect(salientTerms(request(10))).toEqual(['answer', 'note', 'leas', 'stop', 'two', 'worker']);
  });

  it('sentences break at blank lines and list items, not at "e.g." or "keel.db"', () => {
    expect(
      splitIntoSentences(
        '# Title\nOpen keel.db first, e.g. with sqlite3. Then look.\n\n- One item',
      ),
    ).toEqual(['Title', 'Open keel.db first, e.g. with sqlite3.', 'Then look.', 'One item']);
  });

  it('deltas give the text back exactly, in at most the number asked for', () => {
    expect(deltasOf('one two three four five', 2)).toEqual(['one two three ', 'four five']);
    expect(deltasOf('', 4)).toEqual([]);
  });
});

describe('the degraded provider', () => {
  it('extracts the sentences sharing the salient terms, in their original order', async () => {
    const response = await degradedProvider({ clock: steppingClock() }).complete(request(200));
    // The cafeteria and database sentences share no term; the repeated sentence in the tool
    // result is a duplicate; the question is not an answer; "Notes follow." is too short.
    expect(response).toEqual({
      text: EVERY_MATCH,
      toolCalls: [],
      stopReason: 'end',
      usage: { inputTokens: 0, outputTokens: 0 },
      provider: 'degraded',
      model: 'extractive',
      tier: '',
      degraded: true,
      latencyMs: 7,
    });
  });

  it('keeps the best-ranked sentences that fit in maxTokens * 4 characters, then says max_tokens', async () => {
    // 100 characters: the two sentences sharing three terms (46 + 1 + 44) fit, no third one does.
    const response = await degradedProvider().complete(request(25));
    expect(response.text).toBe(
      'Two workers never hold the same lease at once. Stale workers stop when their lease is lost.',
    );
    expect(response.stopReason).toBe('max_tokens');
  });

  it('cuts the best sentence at a word when not even one fits', async () => {
    const response = await degradedProvider().complete(request(5));
    expect(response.text).toBe('Two workers never');
    expect(response.stopReason).toBe('max_tokens');
  });

  it('stops before a stop sequence', async () => {
    const response = await degradedProvider().complete(request(200, { stopSequences: ['Stale'] }));
    expect(response.text).toBe(EVERY_MATCH.slice(0, EVERY_MATCH.indexOf('Stale')));
    expect(response.stopReason).toBe('stop_sequence');
  });

  it('answers a one-word ping with nothing, at once', async () => {
    const response = await degradedProvider().complete({
      maxTokens: 1,
      messages: [{ role: 'user', content: 'ping' }],
    });
    expect([response.text, response.stopReason, response.degraded]).toEqual(['', 'end', true]);
  });

  it('streams the same answer in a few deltas, then done', async () => {
    const events: ProviderStreamEvent[] = [];
    for await (const e of degradedProvider({ clock: steppingClock() }).stream(request(200))) {
      events.push(e);
    }
    const texts = events.flatMap((e) => (e.type === 'text' ? [e.text] : []));
    expect(texts).toHaveLength(4);
    expect(texts.join('')).toBe(EVERY_MATCH);
    expect(events.at(-1)).toEqual({
      type: 'done',
      response: expect.objectContaining({
        text: EVERY_MATCH,
        stopReason: 'end',
        latencyMs: 7,
      }) as unknown,
    });
    expect(events.slice(0, -1).every((e) => e.type === 'text')).toBe(true);
  });

  it('uses a workflow’s own offline method when given one', async () => {
    const provider = degradedProvider({ answer: (r) => `asked ${r.messages.length} messages` });
    const response = await provider.complete(request(200));
    expect([response.text, response.stopReason, response.degraded]).toEqual([
      'asked 3 messages',
      'end',
      true,
    ]);
  });
});

describe('requests the degraded tier cannot honour', () => {
  const cases: [string, Partial<LlmRequest>, string][] = [
    [
      'a JSON answer',
      { json: true },
      'the degraded offline tier cannot answer in JSON: it only extracts sentences',
    ],
    [
      'a required tool call',
      { toolChoice: 'required', tools: [{ name: 'lookup', inputSchema: { type: 'object' } }] },
      'the degraded offline tier cannot call tools (tool choice "required")',
    ],
    [
      'a named tool',
      { toolChoice: { name: 'lookup' }, tools: [{ name: 'lookup', inputSchema: {} }] },
      'the degraded offline tier cannot call tools (tool "lookup" was required)',
    ],
  ];

  for (const [what, extra, message] of cases) {
    it(`refuses ${what} as not_found, so the router moves on`, async () => {
      const err = await refusal(degradedProvider().complete(request(200, extra)));
      expect(err.message).toBe(`degraded: ${message}`);
      expect(err.failure).toEqual({
        status: 404,
        body: { error: { type: 'not_found_error', code: 'degraded_tier_unsupported', message } },
        message,
      });
      expect(classifyFailure(err.failure)).toEqual({
        class: 'not_found',
        reason: '404 degraded_tier_unsupported',
      });
    });
  }

  it('refuses in stream() too', async () => {
    const stream = degradedProvider().stream(request(200, { json: true }));
    const err = await refusal((async () => stream[Symbol.asyncIterator]().next())());
    expect(err.failure.status).toBe(404);
  });

  it('with its own method, a JSON request is answered only when the method gives a JSON object', async () => {
    const json = degradedProvider({ answer: () => '{"ok":true}' });
    expect((await json.complete(request(200, { json: true }))).text).toBe('{"ok":true}');
    const prose = degradedProvider({ answer: () => 'not json' });
    const err = await refusal(prose.complete(request(200, { json: true })));
    expect(err.message).toBe(
      'degraded: the degraded offline tier cannot answer in JSON: its method gave no JSON object',
    );
  });

  it('the router skips it for that call and answers from the next tier', async () => {
    const router = createRouter({
      clock: systemClock,
      tiers: [
        { name: 'offline', provider: degradedProvider() },
        { name: 'custom', provider: degradedProvider({ answer: () => '{"n":1}' }) },
      ],
    });
    const response = await router.complete(request(200, { json: true }));
    expect(response.text).toBe('{"n":1}');
    expect(response.tier).toBe('custom');
    expect(response.attempts.map((a) => [a.tier, a.class, a.status])).toEqual([
      ['offline', 'not_found', 404],
      ['custom', undefined, undefined],
    ]);
    // The refusal costs the tier nothing: the next plain request is answered by it.
    const plain = await router.complete(request(200));
    expect([plain.tier, plain.text]).toEqual(['offline', EVERY_MATCH]);
    expect(router.breakers().offline).toEqual({ state: 'closed', failures: 0, openUntil: 0 });
  });

  it('alone, it leaves the router with no tier for the call', async () => {
    const router = createRouter({
      clock: systemClock,
      tiers: [{ name: 'degraded', provider: degradedProvider() }],
    });
    const err: unknown = await router.complete(request(200, { toolChoice: 'required' })).then(
      () => undefined,
      (e: unknown) => e,
    );
    expect(err).toBeInstanceOf(LlmUnavailableError);
    const unavailable = err as LlmUnavailableError;
    expect(unavailable.message).toMatch(/^no LLM tier answered \(no tier is available\)/);
    expect(unavailable.attempts.map((a) => [a.tier, a.class, a.status])).toEqual([
      ['degraded', 'not_found', 404],
    ]);
  });
});
