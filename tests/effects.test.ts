/**
 * Effect semantics: the call that timed out but happened (C22), against a real HTTP sink on
 * 127.0.0.1; and how keys behave within and across runs and step retries.
 */
import { createServer, type Server } from 'node:http';
import type { AddressInfo } from 'node:net';
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { openEngine, workflow, type Engine, type RunView } from 'keel';
import {
  FIXTURES,
  keel,
  keelJson,
  killHard,
  lines,
  spawnKeel,
  tempDir,
  waitFor,
  type KeelResult,
} from './support/index.ts';

const TIMEOUT = join(FIXTURES, 'fx-timeout.ts');

type SinkRequest = { path: string; key: string; attempt: string | null };

/**
 * A sink that honours idempotency keys: it applies a key once, at once, and answers a key's first
 * request after `lateMs` (never, when null); repeated keys are answered at once with the same receipt.
 */
type Sink = { url: string; requests: SinkRequest[]; applied: Map<string, string> };

const servers: Server[] = [];
const engines: Engine[] = [];

afterEach(async () => {
  for (const engine of engines.splice(0)) await engine.close();
  for (const server of servers.splice(0)) {
    server.closeAllConnections();
    await new Promise((r) => server.close(r));
  }
});

async function startSink(lateMs: number | null): Promise<Sink> {
  const requests: SinkRequest[] = [];
  const applied = new Map<string, string>();
  const server = createServer((req, res) => {
    const url = new URL(req.url ?? '/', 'http://127.0.0.1');
    const reply = (body: unknown) => {
      res.setHeader('content-type', 'application/json');
      res.end(JSON.stringify(body));
    };
    if (req.method === 'POST' && url.pathname === '/apply') {
      const key = String(req.headers['idempotency-key'] ?? '');
      const attempt = req.headers['x-attempt'];
      requests.push({ path: '/apply', key, attempt: typeof attempt === 'string' ? attempt : null });
      const seen = applied.get(key);
      if (seen !== undefined) return reply({ receipt: seen });
      const receipt = `rcpt-${applied.size + 1}`;
      applied.set(key, receipt);
      if (lateMs === null) return; // held until the client goes away
      const timer = setTimeout(() => reply({ receipt }), lateMs);
      res.on('close', () => clearTimeout(timer));
      return;
    }
    if (req.method === 'GET' && url.pathname === '/status') {
      const key = url.searchParams.get('key') ?? '';
      requests.push({ path: '/status', key, attempt: null });
      const receipt = applied.get(key);
      return reply(receipt === undefined ? { applied: false } : { applied: true, receipt });
    }
    res.statusCode = 404;
    res.end();
  });
  servers.push(server);
  await new Promise<void>((r) => server.listen(0, '127.0.0.1', r));
  const { port } = server.address() as AddressInfo;
  return { url: `http://127.0.0.1:${port}`, requests, applied };
}

function parse(result: KeelResult): RunView {
  try {
    return JSON.parse(result.stdout) as RunView;
  } catch {
    throw new Error(`no JSON (exit ${result.code}):\n${result.stdout}\n${result.stderr}`);
  }
}

const effectOf = (view: RunView, name: string) => {
  const found = view.effects.find((e) => e.name === name);
  if (!found) throw new Error(`no effect ${name} in run ${view.id}`);
  return found;
};

describe('C22 the call that timed out but happened', () => {
  it('C22: a timed-out call that the sink applied is retried with the same idempotency key, and the sink holds one effect', async () => {
    const sink = await startSink(5_000);
    const db = join(tempDir('keel-fx-'), 'keel.db');
    const result = await keel(['--db', db, 'run', TIMEOUT, '--input', '{"order":"a1"}', '--json'], {
      env: { SINK_URL: sink.url, FX_MODE: 'keyed' },
    });
    expect(result.code).toBe(0);
    const view = parse(result);
    expect(view.status).toBe('completed');
    expect(sink.requests).toEqual([
      { path: '/apply', key: 'order:a1', attempt: '1' },
      { path: '/apply', key: 'order:a1', attempt: '2' },
    ]);
    expect([...sink.applied]).toEqual([['order:a1', 'rcpt-1']]);
    expect(effectOf(view, 'post')).toMatchObject({
      key: 'order:a1',
      status: 'done',
      attempts: 2,
      result: { receipt: 'rcpt-1' },
    });
  });

  it('C22: without key support or reconcile, a timed-out call is reported as outcome unknown and never sent again, not even by resume', async () => {
    const sink = await startSink(5_000);
    const db = join(tempDir('keel-fx-'), 'keel.db');
    const env = { SINK_URL: sink.url, FX_MODE: 'unknown' };
    const result = await keel(['--db', db, 'run', TIMEOUT, '--input', '{"order":"a2"}', '--json'], {
      env,
    });
    expect(result.code).toBe(1);
    const view = parse(result);
    expect(view.status).toBe('failed');
    const message =
      'Effect "post" (key "order:a2") was started but whether it happened is unknown: it does not honour keys and has no reconcile().';
    expect(view.error).toMatchObject({
      name: 'EffectOutcomeUnknownError',
      code: 'EFFECT_OUTCOME_UNKNOWN',
      step: 'post',
      key: 'order:a2',
    });
    expect(view.error?.message.split('\n')[0]).toBe(message);
    expect(effectOf(view, 'post')).toMatchObject({ status: 'unknown', attempts: 1 });
    expect(sink.requests).toEqual([{ path: '/apply', key: 'order:a2', attempt: '1' }]);

    const resumed = await keel(['--db', db, 'resume', view.id, '--json'], { env });
    expect(resumed.code).toBe(1);
    const after = parse(resumed);
    expect(after.status).toBe('failed');
    expect(after.error).toMatchObject({ code: 'EFFECT_OUTCOME_UNKNOWN', step: 'post' });
    expect(effectOf(after, 'post')).toMatchObject({ status: 'unknown', attempts: 1 });
    expect(sink.requests).toEqual([{ path: '/apply', key: 'order:a2', attempt: '1' }]);
  });

  it('C22: with reconcile, a call in flight when the process died is recorded reconciled on resume, without being sent again', async () => {
    const sink = await startSink(null);
    const db = join(tempDir('keel-fx-'), 'keel.db');
    const env = { SINK_URL: sink.url, FX_MODE: 'reconcile', FX_TIMEOUT_MS: '30000' };
    const child = spawnKeel(['--db', db, 'run', TIMEOUT, '--input', '{"order":"a3"}'], { env });
    await waitFor(() => sink.requests.length === 1, 20_000, 'the call to reach the sink');
    await killHard(child);

    const [run] = await keelJson<{ id: string; status: string }[]>(['--db', db, 'ls']);
    expect(run?.status).toBe('running');
    const resumed = await keel(['--db', db, 'resume', run!.id, '--json'], { env });
    expect(resumed.code).toBe(0);
    const view = parse(resumed);
    expect(view.status).toBe('completed');
    expect(effectOf(view, 'post')).toMatchObject({
      status: 'reconciled',
      attempts: 1,
      result: { receipt: 'rcpt-1' },
    });
    expect(sink.requests).toEqual([
      { path: '/apply', key: 'order:a3', attempt: '1' },
      { path: '/status', key: 'order:a3', attempt: null },
    ]);
  });

  it('C22: with reconcile, a timed-out call is asked about instead of being sent again', async () => {
    const sink = await startSink(5_000);
    const db = join(tempDir('keel-fx-'), 'keel.db');
    const result = await keel(['--db', db, 'run', TIMEOUT, '--input', '{"order":"a4"}', '--json'], {
      env: { SINK_URL: sink.url, FX_MODE: 'reconcile' },
    });
    expect(result.code).toBe(0);
    const view = parse(result);
    expect(effectOf(view, 'post')).toMatchObject({
      status: 'reconciled',
      attempts: 1,
      result: { receipt: 'rcpt-1' },
    });
    expect(sink.requests).toEqual([
      { path: '/apply', key: 'order:a4', attempt: '1' },
      { path: '/status', key: 'order:a4', attempt: null },
    ]);
  });
});

describe('effect keys', () => {
  function engineAt(): Engine {
    const engine = openEngine({ db: join(tempDir('keel-fx-'), 'keel.db') });
    engines.push(engine);
    return engine;
  }

  it('one key used by two different effects in a run fails the run with a DefinitionError naming both, without retrying', async () => {
    const engine = engineAt();
    const calls: string[] = [];
    const wf = workflow<{ n: number }>('fx-clash', { version: 1 }).step(
      'pay',
      async (_state, ctx) => {
        await ctx.effect('charge', { key: 'shared', run: () => void calls.push('charge') });
        await ctx.effect('refund', { key: 'shared', run: () => void calls.push('refund') });
      },
      { retry: { attempts: 3, backoff: 1 } },
    );
    const result = await engine.start(wf, { n: 1 });
    expect(result.status).toBe('failed');
    expect(result.error).toMatchObject({
      name: 'DefinitionError',
      code: 'DEFINITION',
      step: 'pay',
    });
    expect(result.error?.message.split('\n')[0]).toBe(
      'Effect "refund" uses key "shared", which effect "charge" already used in this run.',
    );
    expect(calls).toEqual(['charge']);
    const view = await engine.get(result.id);
    expect(view.steps.map((s) => [s.name, s.status, s.attempts])).toEqual([['pay', 'failed', 1]]);
    expect(view.effects.map((e) => [e.name, e.status])).toEqual([['charge', 'done']]);
  });

  it('effect keys are scoped to the run: two runs using the same key each apply their effect once', async () => {
    const engine = engineAt();
    const calls: string[] = [];
    const wf = workflow<{ order: string }>('fx-scope', { version: 1 }).effect('send', {
      key: (s) => `send:${s.order}`,
      run: (_s, { key, runId }) => {
        calls.push(`${runId} ${key}`);
        return calls.length;
      },
    });
    const first = await engine.start(wf, { order: 'same' });
    const second = await engine.start(wf, { order: 'same' });
    expect([first.status, second.status]).toEqual(['completed', 'completed']);
    expect(calls).toEqual([`${first.id} send:same`, `${second.id} send:same`]);
    expect((await engine.get(first.id)).effects.map((e) => [e.key, e.status, e.result])).toEqual([
      ['send:same', 'done', 1],
    ]);
    expect((await engine.get(second.id)).effects.map((e) => [e.key, e.status, e.result])).toEqual([
      ['send:same', 'done', 2],
    ]);
  });

  it('a step retried after its ctx.effect succeeded reuses the recorded result instead of applying it again', async () => {
    const engine = engineAt();
    const applied: number[] = [];
    const seen: Array<[number, number]> = [];
    const wf = workflow<{ receipt?: number }>('fx-retry', { version: 1 }).step(
      'charge',
      async (state, ctx) => {
        const receipt = await ctx.effect('charge', {
          key: 'charge:1',
          run: () => {
            applied.push(ctx.attempt);
            return 100 + applied.length;
          },
        });
        seen.push([ctx.attempt, receipt]);
        state.receipt = receipt;
        if (ctx.attempt === 1) throw new Error('failed after the charge');
      },
      { retry: { attempts: 3, backoff: 1 } },
    );
    const result = await engine.start(wf, {});
    expect(result.status).toBe('completed');
    expect(result.state).toEqual({ receipt: 101 });
    expect(applied).toEqual([1]);
    expect(seen).toEqual([
      [1, 101],
      [2, 101],
    ]);
    const view = await engine.get(result.id);
    expect(view.steps.map((s) => [s.name, s.status, s.attempts])).toEqual([
      ['charge', 'completed', 2],
    ]);
    expect(view.effects.map((e) => [e.name, e.status, e.attempts, e.result])).toEqual([
      ['charge', 'done', 1, 101],
    ]);
  });
});

describe('saving an effect step result into the state', () => {
  const SAVE = join(FIXTURES, 'fx-save.ts');

  for (const point of ['effect:after-run', 'step:inside-commit', 'step:after-commit']) {
    it(`a later step reads the recorded result after a kill at ${point}`, async () => {
      const dir = tempDir('keel-save-');
      const db = join(dir, 'keel.db');
      const env = { FX_SAVE_DIR: dir };
      const input = JSON.stringify({ order: 'o-1' });
      const first = await keel(['run', SAVE, '--db', db, '--input', input], {
        env: { ...env, KEEL_CRASH_AT: `${point}@1` },
      });
      expect(first.signal).toBe('SIGKILL');
      const resumed = await keel(['resume', '--all', '--db', db], { env });
      expect(resumed.code).toBe(0);
      const [run] = await keelJson<{ id: string }[]>(['ls', '--db', db]);
      const view = await keelJson<RunView>(['show', run!.id, '--db', db]);
      const receipt = readFileSync(join(dir, 'charge_o_1.receipt'), 'utf8');
      expect(view.status).toBe('completed');
      expect(view.state).toEqual({ order: 'o-1', receipt, note: `paid with ${receipt}` });
      expect(view.effects.map((e) => [e.name, e.status, e.result])).toEqual([
        ['charge', 'done', { receipt }],
      ]);
      const calls = lines(join(dir, 'calls.log'));
      // Killed before the milestone that records the result committed, the charge is sent again
      // with the same key (the sink answers with the first receipt); after it, never.
      const recorded = point === 'step:after-commit';
      expect(calls).toEqual(recorded ? ['charge:o-1'] : ['charge:o-1', 'charge:o-1']);
    });
  }
});
