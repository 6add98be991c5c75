/**
 * `ctx.llm` inside steps: the journal (replay without a provider call, mismatch), what `engine.get`
 * and `keel show --json` report of each call, costs, shared breakers and key hygiene. Real SQLite
 * files, the real SDKs over HTTP to the fake servers on 127.0.0.1.
 */
import { readFileSync, readdirSync } from 'node:fs';
import { join } from 'node:path';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { openEngine, workflow, type Engine } from '../adapters/index.ts';
import { anthropicProvider } from '../adapters/llm/anthropic.ts';
import { openaiProvider } from '../adapters/llm/openai.ts';
import { createRouter, type RouterTier } from '../engine/llm/router.ts';
import type { LlmRequest } from '../engine/llm/types.ts';
import { startFakeAnthropic, type FakeAnthropic } from './support/fake-anthropic.ts';
import { startFakeOpenAI, type FakeOpenAI } from './support/fake-openai.ts';
import { keelJson, tempDir } from './support/index.ts';

const KEY = 'sk-journal-test-SECRET-4242424242';
const dir = tempDir('keel-journal-');
let n = 0;
let primary: FakeOpenAI;
let secondary: FakeAnthropic;
const engines: Engine[] = [];

beforeEach(async () => {
  [primary, secondary] = await Promise.all([startFakeOpenAI(), startFakeAnthropic()]);
});

afterEach(async () => {
  await Promise.all(engines.splice(0).map((e) => e.close()));
  await Promise.all([primary.close(), secondary.close()]);
});

function tiers(): RouterTier[] {
  return [
    {
      name: 'primary',
      provider: openaiProvider({ apiKey: KEY, baseURL: primary.url, model: 'gpt-p' }),
      price: { input: 2, output: 8 },
    },
    {
      name: 'secondary',
      provider: anthropicProvider({ apiKey: KEY, baseURL: secondary.url, model: 'claude-s' }),
      price: { input: 3, output: 15 },
    },
  ];
}

function open(db = join(dir, `j${++n}.db`)) {
  const engine = openEngine({
    db,
    llm: (states) =>
      createRouter({ tiers: tiers(), clock: fastClock, states, random: () => 0, budget: 4 }),
  });
  engines.push(engine);
  return { engine, db };
}

/** The real clock for timestamps, but retry waits that take no time. */
const fastClock = { now: () => Date.now(), sleep: () => Promise.resolve() };

const ask = (content: string): LlmRequest => ({
  messages: [{ role: 'user', content }],
  maxTokens: 32,
});

type Notes = { answers: string[]; failOnce?: boolean; attempt?: number };

/** One step that makes three calls, then fails its first attempt (so the retry meets the journal). */
const threeCalls = workflow<Notes>('three-calls', { version: 1 }).step(
  'ask',
  async (state, ctx) => {
    state.answers = [];
    for (const q of ['one', 'two', 'three']) {
      const res = await ctx.llm(ask(q));
      state.answers.push(`${res.tier}:${res.text}`);
    }
    if (state.failOnce && ctx.attempt === 1) throw new Error('flaky after the calls');
  },
  { retry: { attempts: 2, backoff: 0 } },
);

describe('the journal', () => {
  it('a retried step gets its three completed calls back without a provider call', async () => {
    primary.script({ text: 'A' }, { text: 'B' }, { text: 'C' });
    const { engine } = open();
    const result = await engine.start(threeCalls, { answers: [], failOnce: true });
    expect(result.status).toBe('completed');
    expect(result.state.answers).toEqual(['primary:A', 'primary:B', 'primary:C']);
    expect(primary.requests).toHaveLength(3);
    expect(secondary.requests).toHaveLength(0);
    const view = await engine.get(result.id);
    expect(view.llmCalls.map((c) => [c.step, c.position, c.tier, c.replayed, c.replays])).toEqual([
      ['ask', 0, 'primary', true, 1],
      ['ask', 1, 'primary', true, 1],
      ['ask', 2, 'primary', true, 1],
    ]);
  });

  it('a different request at a recorded position fails the step with LLM_JOURNAL_MISMATCH, not retried again', async () => {
    const drifting = workflow<{ text?: string }>('drifting', { version: 1 }).step(
      'ask',
      async (state, ctx) => {
        // The prompt depends on the attempt: the retry asks something else at position 0.
        const res = await ctx.llm(ask(`attempt ${ctx.attempt}`));
        state.text = res.text;
        if (ctx.attempt === 1) throw new Error('flaky');
      },
      { retry: { attempts: 3, backoff: 0 } },
    );
    const { engine } = open();
    const result = await engine.start(drifting, {});
    expect(result.status).toBe('failed');
    expect(result.error?.code).toBe('LLM_JOURNAL_MISMATCH');
    expect(result.error?.message).toContain(
      'Step "ask" of run ' + result.id + ' made a different request at LLM call 1 (position 0)',
    );
    expect(primary.requests).toHaveLength(1);
    const view = await engine.get(result.id);
    expect(view.steps.map((s) => [s.name, s.status, s.attempts])).toEqual([['ask', 'failed', 2]]);
  });

  it('records tier, provider, model, attempts, tokens and cost; failover from a 500 is one failover', async () => {
    primary.script({ status: 500, error: { message: 'boom', type: 'server_error' } });
    secondary.script([
      {
        content: [{ type: 'text', text: 'from S' }],
        usage: { input_tokens: 1000, output_tokens: 200 },
      },
    ]);
    const one = workflow<{ text?: string }>('one-call', { version: 1 }).step(
      'ask',
      async (s, ctx) => {
        s.text = (await ctx.llm(ask('hello'))).text;
      },
    );
    const { engine } = open();
    const result = await engine.start(one, {});
    expect(result.status).toBe('completed');
    const [call] = (await engine.get(result.id)).llmCalls;
    expect(call).toMatchObject({
      step: 'ask',
      stepIndex: 1,
      position: 0,
      status: 'completed',
      tier: 'secondary',
      provider: 'anthropic',
      model: 'claude-s',
      degraded: false,
      streamed: false,
      failovers: 1,
      inputTokens: 1000,
      outputTokens: 200,
      replayed: false,
      replays: 0,
      error: null,
    });
    expect(call!.attempts.map((a) => [a.tier, a.class, a.status])).toEqual([
      ['primary', 'server', 500],
      ['secondary', null, null],
    ]);
    // 1000 input tokens at $3/M plus 200 output tokens at $15/M; the 500 reported no usage.
    expect(call!.costUsd).toBeCloseTo(0.003 + 0.003, 10);
    const view = await engine.get(result.id);
    expect(view.llmUsage).toEqual({
      calls: 1,
      inputTokens: 1000,
      outputTokens: 200,
      costUsd: call!.costUsd,
    });
  });

  it('a rejected request (400) fails the step at once: no retry, no other tier, recorded as failed', async () => {
    primary.script({ status: 400, error: { message: 'bad thing', type: 'invalid_request_error' } });
    const one = workflow<{ text?: string }>('rejected', { version: 1 }).step(
      'ask',
      async (s, ctx) => {
        s.text = (await ctx.llm(ask('hello'))).text;
      },
      { retry: { attempts: 5, backoff: 0 } },
    );
    const { engine } = open();
    const result = await engine.start(one, {});
    expect(result.status).toBe('failed');
    expect(result.error?.code).toBe('LLM_REJECTED');
    expect([primary.requests.length, secondary.requests.length]).toEqual([1, 0]);
    const [call] = (await engine.get(result.id)).llmCalls;
    expect(call).toMatchObject({ status: 'failed', tier: null, inputTokens: 0 });
    expect(call!.error?.code).toBe('LLM_REJECTED');
    expect(call!.attempts.map((a) => [a.tier, a.class, a.status])).toEqual([
      ['primary', 'bad_request', 400],
    ]);
  });

  it('keel show --json lists llmCalls with the fixed fields', async () => {
    primary.script({ text: 'A', usage: { promptTokens: 11, completionTokens: 3 } });
    const one = workflow<{ text?: string }>('shown', { version: 1 }).step('ask', async (s, ctx) => {
      s.text = (await ctx.llm(ask('hello'))).text;
    });
    const { engine, db } = open();
    const result = await engine.start(one, {});
    await engine.close();
    const shown = await keelJson<{ llmCalls: Record<string, unknown>[] }>([
      'show',
      result.id,
      '--db',
      db,
    ]);
    expect(shown.llmCalls).toHaveLength(1);
    const call = shown.llmCalls[0]!;
    expect({
      step: call.step,
      tier: call.tier,
      provider: call.provider,
      model: call.model,
      inputTokens: call.inputTokens,
      outputTokens: call.outputTokens,
      replayed: call.replayed,
    }).toEqual({
      step: 'ask',
      tier: 'primary',
      provider: 'openai',
      model: 'gpt-p',
      inputTokens: 11,
      outputTokens: 3,
      replayed: false,
    });
    expect(
      (call.attempts as Record<string, unknown>[]).map((a) => [a.tier, a.class, a.status]),
    ).toEqual([['primary', null, null]]);
  });
});

describe('ctx.llm.stream', () => {
  it('streams text, records the call as streamed, and a retry gets the whole text back from the journal', async () => {
    primary.script({ text: 'streamed words' });
    type Seen = { events?: string[][]; failOnce?: boolean };
    const streaming = workflow<Seen>('streaming', { version: 1 }).step(
      'ask',
      async (state, ctx) => {
        const seen: string[] = [];
        for await (const event of ctx.llm.stream(ask('hello'))) {
          seen.push(event.type === 'text' ? event.text : event.type);
        }
        (state.events ??= []).push(seen);
        if (ctx.attempt === 1) throw new Error('flaky after the stream');
      },
      { retry: { attempts: 2, backoff: 0 } },
    );
    const { engine } = open();
    const result = await engine.start(streaming, {});
    expect(result.status).toBe('completed');
    // The first attempt's state was discarded with its failure; the retry's replay is one piece.
    expect(result.state.events).toEqual([['streamed words', 'done']]);
    expect(primary.requests).toHaveLength(1);
    const [call] = (await engine.get(result.id)).llmCalls;
    expect([call!.streamed, call!.replayed, call!.tier]).toEqual([true, true, 'primary']);
  });
});

describe('breakers in the database', () => {
  it('a second engine on the same database skips a tier the first one found down, without a request', async () => {
    // Three 500s open the primary's breaker (threshold 3); the secondary answers each call.
    primary.script(
      ...Array.from({ length: 3 }, () => ({
        status: 500,
        error: { message: 'down', type: 'server_error' },
      })),
    );
    const one = workflow<{ text?: string }>('breaker', { version: 1 }).step(
      'ask',
      async (s, ctx) => {
        s.text = (await ctx.llm(ask('hello'))).text;
      },
    );
    const first = open();
    for (let i = 0; i < 3; i++) {
      expect((await first.engine.start(one, {})).status).toBe('completed');
    }
    expect(primary.requests).toHaveLength(3);
    const second = open(first.db);
    const result = await second.engine.start(one, {});
    expect(result.status).toBe('completed');
    expect(primary.requests).toHaveLength(3);
    const [call] = (await second.engine.get(result.id)).llmCalls;
    expect(call!.attempts.map((a) => a.tier)).toEqual(['secondary']);
  });
});

describe('keys', () => {
  it('an API key appears in no byte of the database files, even after a 401 that echoes it', async () => {
    primary.script({
      status: 401,
      error: {
        message: `Incorrect API key provided: ${KEY}`,
        type: 'invalid_request_error',
        code: 'invalid_api_key',
      },
    });
    const one = workflow<{ text?: string }>('keys', { version: 1 }).step('ask', async (s, ctx) => {
      s.text = (await ctx.llm(ask('hello'))).text;
    });
    const { engine, db } = open();
    const result = await engine.start(one, {});
    expect(result.status).toBe('completed');
    await engine.close();
    const files = readdirSync(dir).filter((f) => f.startsWith(db.split('/').pop()!));
    expect(files.length).toBeGreaterThan(0);
    for (const file of files) {
      const bytes = readFileSync(join(dir, file));
      expect(bytes.includes(Buffer.from(KEY)), file).toBe(false);
      expect(bytes.includes(Buffer.from(KEY.slice(3, 20))), file).toBe(false);
    }
  });
});
