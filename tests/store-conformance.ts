/**
 * The conformance suite every {@link Store} implementation must pass. It talks to the store only
 * through the interface in `engine/store.ts`, so the same cases run against SQLite today and
 * Postgres later: call {@link storeConformance} from a `*.test.ts` file with a factory that opens a
 * fresh, empty store.
 */
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { isLeaseError } from '../engine/errors.ts';
import type {
  CheckpointRecord,
  EffectRecord,
  LlmCallRecord,
  Milestone,
  RunRecord,
  StepRecord,
  Store,
} from '../engine/store.ts';

export type OpenStore = () => Promise<{ store: Store; cleanup(): Promise<void> }>;

/** A fixed clock reading, so that every stored time is an exact value. */
const T0 = 1_750_000_000_000;

function runRecord(id: string, overrides: Partial<RunRecord> = {}): RunRecord {
  return {
    id,
    workflow: 'conformance',
    version: 1,
    fingerprint: `fp-${id}`,
    graph: '{"nodes":[{"name":"first","kind":"step"}],"routes":[]}',
    module: null,
    status: 'running',
    input: '{"topic":"leases"}',
    cursor: 'first',
    cursorAttempts: 0,
    stepCount: 0,
    seq: 1,
    snapshotSeq: 1,
    snapshotBytes: 18,
    patchBytes: 0,
    patchCount: 0,
    error: null,
    options: '{"rollbackOnFailure":false}',
    epoch: 1,
    lease: { owner: 'host-a:101:first', pid: 101, host: 'host-a', expiresAt: T0 + 30_000 },
    createdAt: T0,
    updatedAt: T0,
    endedAt: null,
    cancelRequested: false,
    ...overrides,
  };
}

function snapshotOf(run: RunRecord): CheckpointRecord {
  return {
    runId: run.id,
    seq: 1,
    kind: 'snapshot',
    step: null,
    data: run.input,
    createdAt: run.createdAt,
  };
}

function checkpoint(runId: string, seq: number, step = 'first'): CheckpointRecord {
  return {
    runId,
    seq,
    kind: 'patch',
    step,
    data: `[{"op":"replace","path":["n"],"value":${seq}}]`,
    createdAt: T0 + seq,
  };
}

function stepRecord(runId: string, index: number, overrides: Partial<StepRecord> = {}): StepRecord {
  return {
    runId,
    index,
    name: 'first',
    status: 'completed',
    attempts: 1,
    next: 'second',
    startedAt: T0 + index * 10,
    endedAt: T0 + index * 10 + 5,
    error: null,
    ...overrides,
  };
}

function effectRecord(runId: string, key: string, overrides: Partial<EffectRecord> = {}) {
  const record: EffectRecord = {
    runId,
    key,
    name: 'charge',
    step: 'pay',
    status: 'started',
    result: null,
    error: null,
    attempts: 1,
    startedAt: T0 + 100,
    completedAt: null,
    completionOrder: null,
    compensationAttempts: 0,
    compensatedAt: null,
    compensable: true,
    ...overrides,
  };
  return record;
}

function llmCall(runId: string, position: number, overrides: Partial<LlmCallRecord> = {}) {
  const record: LlmCallRecord = {
    runId,
    stepIndex: 1,
    position,
    step: 'ask',
    requestHash: `hash-${position}`,
    status: 'completed',
    streamed: false,
    response: `{"text":"answer ${position}"}`,
    error: null,
    tier: 'primary',
    provider: 'anthropic',
    model: 'claude-x',
    degraded: false,
    attempts: '[{"tier":"primary"}]',
    inputTokens: 120,
    outputTokens: 30,
    cacheReadTokens: 5,
    cacheWriteTokens: 7,
    costUsd: 0.00081,
    latencyMs: 412,
    replays: 0,
    createdAt: T0 + 200,
    updatedAt: T0 + 200,
    ...overrides,
  };
  return record;
}

const claim = (owner: string, expiresAt = T0 + 60_000) => ({
  owner,
  pid: 202,
  host: 'host-b',
  expiresAt,
});

/** Everything the store holds about a run, read through the interface. */
async function everything(store: Store, id: string, keys: string[] = []) {
  return {
    run: await store.getRun(id),
    checkpoints: await store.loadCheckpoints(id, 0),
    steps: await store.listSteps(id),
    effects: await store.listEffects(id),
    byKey: await Promise.all(keys.map((key) => store.getEffect(id, key))),
  };
}

async function rejection(work: Promise<unknown>): Promise<unknown> {
  try {
    await work;
  } catch (error) {
    return error;
  }
  throw new Error('expected the call to be refused, and it succeeded');
}

export function storeConformance(name: string, open: OpenStore): void {
  describe(`Store conformance: ${name}`, () => {
    let store: Store;
    let cleanup: () => Promise<void>;

    beforeEach(async () => {
      const opened = await open();
      store = opened.store;
      cleanup = () => opened.cleanup();
    });

    afterEach(async () => {
      await cleanup();
    });

    async function create(run: RunRecord): Promise<RunRecord> {
      await store.createRun(run, snapshotOf(run));
      return run;
    }

    it('no field of a run is lost or altered between createRun and getRun', async () => {
      const full = runRecord('run-full', {
        workflow: 'brief',
        version: 7,
        fingerprint: 'sha256:9f2c',
        graph:
          '{"nodes":[{"name":"search","kind":"step"}],"routes":[{"from":"search","targets":null}]}',
        module: '/srv/flows/brief.ts',
        status: 'failed',
        input: '{"topic":"leases","big":{"$":"B","v":"1180591620717411303424"}}',
        cursor: 'analyze',
        cursorAttempts: 2,
        stepCount: 7,
        seq: 9,
        snapshotSeq: 5,
        snapshotBytes: 1234,
        patchBytes: 321,
        patchCount: 4,
        error: '{"name":"Error","message":"provider down","step":"analyze"}',
        options: '{"rollbackOnFailure":true}',
        lease: { owner: 'host-a:101:abc', pid: 101, host: 'host-a', expiresAt: T0 + 45_000 },
        createdAt: T0 + 1,
        updatedAt: T0 + 4_000,
        endedAt: T0 + 5_000,
      });
      const sparse = runRecord('run-sparse', { lease: null, cursor: null, module: null });
      await create(full);
      await create(sparse);
      expect(await store.getRun('run-full')).toStrictEqual(full);
      expect(await store.getRun('run-sparse')).toStrictEqual(sparse);
      expect(await store.loadCheckpoints('run-full', 0)).toStrictEqual([snapshotOf(full)]);
    });

    it('an unknown run id is never mistaken for a run: undefined, no steps, effects or checkpoints', async () => {
      await create(runRecord('known'));
      expect(await store.getRun('unknown')).toBeUndefined();
      expect(await store.listSteps('unknown')).toStrictEqual([]);
      expect(await store.listEffects('unknown')).toStrictEqual([]);
      expect(await store.loadCheckpoints('unknown', 0)).toStrictEqual([]);
    });

    it('listRuns applies every filter: status (one or several), workflow, limit; newest first', async () => {
      // Created out of order, so that newest-first cannot come from insertion order.
      await create(runRecord('r3', { workflow: 'alpha', status: 'completed', createdAt: T0 + 3 }));
      await create(runRecord('r1', { workflow: 'alpha', status: 'running', createdAt: T0 + 1 }));
      await create(runRecord('r4', { workflow: 'alpha', status: 'failed', createdAt: T0 + 4 }));
      await create(runRecord('r2', { workflow: 'beta', status: 'failed', createdAt: T0 + 2 }));
      const ids = async (filter?: Parameters<Store['listRuns']>[0]) =>
        (await store.listRuns(filter)).map((r) => r.id);
      expect(await ids()).toStrictEqual(['r4', 'r3', 'r2', 'r1']);
      expect(await ids({ status: 'failed' })).toStrictEqual(['r4', 'r2']);
      expect(await ids({ status: ['running', 'completed'] })).toStrictEqual(['r3', 'r1']);
      expect(await ids({ status: 'waiting' })).toStrictEqual([]);
      expect(await ids({ workflow: 'alpha' })).toStrictEqual(['r4', 'r3', 'r1']);
      expect(await ids({ workflow: 'alpha', status: 'failed' })).toStrictEqual(['r4']);
      expect(await ids({ workflow: 'gamma' })).toStrictEqual([]);
      expect(await ids({ limit: 2 })).toStrictEqual(['r4', 'r3']);
      expect(await ids({ status: ['failed', 'completed'], limit: 1 })).toStrictEqual(['r4']);
      const [first] = await store.listRuns({ workflow: 'beta' });
      expect(first).toStrictEqual(
        runRecord('r2', { workflow: 'beta', status: 'failed', createdAt: T0 + 2 }),
      );
    });

    it('C05: two claims at the same epoch never both win: one gets epoch+1, the other null', async () => {
      await create(runRecord('race', { lease: null }));
      const results = await Promise.all([
        store.claimLease('race', 1, claim('owner-a')),
        store.claimLease('race', 1, claim('owner-b')),
      ]);
      expect([...results].sort()).toStrictEqual([2, null]);
      const winner = results[0] === 2 ? 'owner-a' : 'owner-b';
      const run = await store.getRun('race');
      expect(run?.epoch).toBe(2);
      expect(run?.lease).toStrictEqual({
        owner: winner,
        pid: 202,
        host: 'host-b',
        expiresAt: T0 + 60_000,
      });
      // A claim made from the stale reading loses too; one from the current epoch wins the next.
      expect(await store.claimLease('race', 1, claim('owner-c'))).toBeNull();
      expect(await store.claimLease('race', 2, claim('owner-d', T0 + 90_000))).toBe(3);
      expect((await store.getRun('race'))?.lease?.owner).toBe('owner-d');
    });

    it('claimIdle takes a run nobody holds and writes its first milestone in one step, only if the run is as read', async () => {
      const idle = await create(runRecord('idle', { status: 'queued', lease: null }));
      const start: Milestone = {
        run: { status: 'running', cursor: 'first' },
        checkpoint: checkpoint('idle', 2),
      };
      // Any change since the reading refuses the claim and writes nothing.
      expect(await store.claimIdle('idle', { ...idle, epoch: 0 }, claim('x'), start)).toBeNull();
      expect(await store.claimIdle('idle', { ...idle, seq: 2 }, claim('x'), start)).toBeNull();
      expect(
        await store.claimIdle('idle', { ...idle, updatedAt: T0 + 1 }, claim('x'), start),
      ).toBeNull();
      expect(await store.getRun('idle')).toStrictEqual(idle);
      expect(await store.loadCheckpoints('idle', 1)).toHaveLength(1);

      expect(await store.claimIdle('idle', idle, claim('owner-x'), start)).toBe(2);
      const started = await store.getRun('idle');
      expect(started?.epoch).toBe(2);
      expect(started?.status).toBe('running');
      expect(started?.lease).toStrictEqual({
        owner: 'owner-x',
        pid: 202,
        host: 'host-b',
        expiresAt: T0 + 60_000,
      });
      expect((await store.loadCheckpoints('idle', 1)).map((c) => c.seq)).toStrictEqual([1, 2]);
      // The same reading cannot win twice.
      expect(await store.claimIdle('idle', idle, claim('owner-y'), start)).toBeNull();
    });

    it('claimIdle refuses a run someone holds, and one with a cancel of either kind requested', async () => {
      const held = await create(runRecord('held-idle', { status: 'waiting' }));
      expect(await store.claimIdle('held-idle', held, claim('x'), { run: {} })).toBeNull();
      const cancelled = await create(runRecord('cancel-idle', { status: 'waiting', lease: null }));
      await store.requestCancel('cancel-idle', 2);
      expect((await store.getRun('cancel-idle'))?.cancelRequested).toBe(true);
      expect(await store.claimIdle('cancel-idle', cancelled, claim('x'), { run: {} })).toBeNull();
      expect((await store.getRun('cancel-idle'))?.epoch).toBe(1);
    });

    it('a heartbeat cannot revive a lease that another claim took: renewLease is false once the epoch moved', async () => {
      await create(runRecord('renew'));
      expect(await store.renewLease('renew', 1, T0 + 50_000)).toBe(true);
      expect((await store.getRun('renew'))?.lease).toStrictEqual({
        owner: 'host-a:101:first',
        pid: 101,
        host: 'host-a',
        expiresAt: T0 + 50_000,
      });
      expect(await store.claimLease('renew', 1, claim('owner-b', T0 + 70_000))).toBe(2);
      expect(await store.renewLease('renew', 1, T0 + 99_000)).toBe(false);
      const after = await store.getRun('renew');
      expect(after?.epoch).toBe(2);
      expect(after?.lease).toStrictEqual({
        owner: 'owner-b',
        pid: 202,
        host: 'host-b',
        expiresAt: T0 + 70_000,
      });
    });

    it('C12: a milestone lands whole: run fields, checkpoint, step and effect in one commit', async () => {
      const run = await create(runRecord('m'));
      const milestone: Milestone = {
        run: {
          cursor: 'second',
          stepCount: 1,
          cursorAttempts: 0,
          seq: 2,
          patchBytes: 42,
          patchCount: 1,
          leaseExpiresAt: T0 + 80_000,
        },
        checkpoint: checkpoint('m', 2),
        step: stepRecord('m', 1),
        effect: effectRecord('m', 'charge:1', {
          status: 'done',
          result: '{"receipt":"r-1"}',
          completedAt: T0 + 150,
          completionOrder: 1,
        }),
      };
      await store.commit('m', 1, milestone);
      const stored = await store.getRun('m');
      expect(stored).toStrictEqual({
        ...run,
        cursor: 'second',
        stepCount: 1,
        seq: 2,
        patchBytes: 42,
        patchCount: 1,
        lease: { ...run.lease!, expiresAt: T0 + 80_000 },
        updatedAt: stored?.updatedAt,
      });
      expect(stored?.updatedAt).toBeGreaterThanOrEqual(run.updatedAt);
      expect(await store.loadCheckpoints('m', 0)).toStrictEqual([
        snapshotOf(run),
        checkpoint('m', 2),
      ]);
      expect(await store.listSteps('m')).toStrictEqual([stepRecord('m', 1)]);
      expect(await store.listEffects('m')).toStrictEqual([milestone.effect]);
      expect(await store.getEffect('m', 'charge:1')).toStrictEqual(milestone.effect);
    });

    it('a version change is not half-recorded: version, fingerprint, graph and module move together', async () => {
      const run = await create(runRecord('v'));
      const update = {
        version: 2,
        fingerprint: 'fp-v2',
        graph: '{"nodes":[{"name":"first","kind":"step"},{"name":"extra","kind":"step"}]}',
        module: '/srv/flows/v2.ts',
      };
      await store.commit('v', 1, { run: update });
      const stored = await store.getRun('v');
      expect(stored).toStrictEqual({ ...run, ...update, updatedAt: stored?.updatedAt });
    });

    it('C02: a commit under a stale epoch throws LEASE_LOST and writes nothing', async () => {
      const run = await create(runRecord('stale'));
      await store.commit('stale', 1, {
        run: { seq: 2, cursor: 'second', stepCount: 1 },
        checkpoint: checkpoint('stale', 2),
        step: stepRecord('stale', 1),
        effect: effectRecord('stale', 'charge:1'),
      });
      expect(await store.claimLease('stale', run.epoch, claim('taker'))).toBe(2);
      const before = await everything(store, 'stale', ['charge:1', 'charge:2']);

      const late: Milestone = {
        run: { seq: 3, cursor: 'third', stepCount: 2, status: 'completed', lease: null },
        checkpoint: checkpoint('stale', 3),
        step: stepRecord('stale', 2, { name: 'second', next: null }),
        effect: effectRecord('stale', 'charge:2', { status: 'done', result: '{"ok":true}' }),
      };
      const error = await rejection(store.commit('stale', 1, late));
      expect(isLeaseError(error)).toBe(true);
      expect((error as { code?: string }).code).toBe('LEASE_LOST');

      // An empty milestone is refused the same way: every write checks the epoch.
      const empty = await rejection(store.commit('stale', 1, {}));
      expect((empty as { code?: string }).code).toBe('LEASE_LOST');

      expect(await everything(store, 'stale', ['charge:1', 'charge:2'])).toStrictEqual(before);
      expect(before.byKey[1]).toBeUndefined();
      expect(before.run?.lease?.owner).toBe('taker');
    });

    it('C12: a milestone that throws inside its transaction leaves every table as it was', async () => {
      await create(runRecord('hook', { module: '/srv/flows/v1.ts' }));
      await store.commit('hook', 1, {
        run: { seq: 2, stepCount: 1, cursor: 'second' },
        checkpoint: checkpoint('hook', 2),
        step: stepRecord('hook', 1),
        effect: effectRecord('hook', 'charge:1'),
      });
      const before = await everything(store, 'hook', ['charge:1', 'refund:1']);
      let calls = 0;
      const error = await rejection(
        store.commit(
          'hook',
          1,
          {
            run: {
              seq: 3,
              stepCount: 2,
              cursor: null,
              status: 'completed',
              endedAt: T0 + 999,
              version: 2,
              fingerprint: 'fp-changed',
              graph: '{"nodes":[]}',
              module: '/srv/flows/v2.ts',
              lease: null,
            },
            checkpoint: checkpoint('hook', 3, 'second'),
            step: stepRecord('hook', 2, { name: 'second', next: null }),
            effect: effectRecord('hook', 'charge:1', {
              status: 'done',
              result: '{"receipt":"r-9"}',
              completedAt: T0 + 500,
              completionOrder: 1,
            }),
          },
          {
            inside: () => {
              calls += 1;
              throw new Error('power cut between two rows');
            },
          },
        ),
      );
      expect(calls).toBe(1);
      expect((error as Error).message).toBe('power cut between two rows');
      expect(await everything(store, 'hook', ['charge:1', 'refund:1'])).toStrictEqual(before);
      expect(before.run?.lease?.owner).toBe('host-a:101:first');
    });

    it('a finished run does not stay held: lease: null releases it and keeps the epoch for the next claim', async () => {
      await create(runRecord('done'));
      await store.commit('done', 1, {
        run: { status: 'completed', cursor: null, endedAt: T0 + 700, lease: null },
      });
      const ended = await store.getRun('done');
      expect(ended?.lease).toBeNull();
      expect(ended?.epoch).toBe(1);
      expect(ended?.status).toBe('completed');
      expect(ended?.endedAt).toBe(T0 + 700);
      expect(await store.claimLease('done', 1, claim('rollbacker'))).toBe(2);
      expect((await store.getRun('done'))?.lease?.owner).toBe('rollbacker');
    });

    it('resume never replays checkpoints out of order or from another run: by seq, from a seq, per run', async () => {
      const run = await create(runRecord('cp'));
      await create(runRecord('other'));
      // Written out of order: the order must come from seq, not from insertion.
      for (const seq of [4, 2, 3]) {
        await store.commit('cp', 1, { run: { seq }, checkpoint: checkpoint('cp', seq) });
      }
      await store.commit('other', 1, { run: { seq: 2 }, checkpoint: checkpoint('other', 2) });
      expect(await store.loadCheckpoints('cp', 3)).toStrictEqual([
        checkpoint('cp', 3),
        checkpoint('cp', 4),
      ]);
      expect(await store.loadCheckpoints('cp', 1)).toStrictEqual([
        snapshotOf(run),
        checkpoint('cp', 2),
        checkpoint('cp', 3),
        checkpoint('cp', 4),
      ]);
      expect(await store.loadCheckpoints('cp', 5)).toStrictEqual([]);
    });

    it('lists effects by start time, and effects started in the same millisecond in the order they completed', async () => {
      await create(runRecord('order'));
      const effects = [
        // Keys in the opposite order to completion: a tie must not fall back to key order.
        effectRecord('order', 'z-first', { status: 'done', completionOrder: 1, startedAt: T0 + 5 }),
        effectRecord('order', 'm-second', {
          status: 'done',
          completionOrder: 2,
          startedAt: T0 + 5,
        }),
        effectRecord('order', 'a-open', { startedAt: T0 + 5 }),
        effectRecord('order', 'b-earliest', { startedAt: T0 + 1 }),
      ];
      for (const effect of effects) await store.commit('order', 1, { effect });
      expect((await store.listEffects('order')).map((e) => e.key)).toStrictEqual([
        'b-earliest',
        'z-first',
        'm-second',
        'a-open',
      ]);
    });

    it('C01: an effect has one row per (run, key): its outcome replaces the started row, never duplicates it', async () => {
      await create(runRecord('fx'));
      await create(runRecord('fx-other'));
      const started = effectRecord('fx', 'charge:1');
      await store.commit('fx', 1, { effect: started });
      expect(await store.getEffect('fx', 'charge:1')).toStrictEqual(started);

      const done = effectRecord('fx', 'charge:1', {
        status: 'done',
        result: '{"receipt":"r-1"}',
        attempts: 2,
        completedAt: T0 + 160,
        completionOrder: 1,
      });
      await store.commit('fx', 1, { effect: done });
      const compensated = {
        ...done,
        status: 'compensated' as const,
        compensationAttempts: 1,
        compensatedAt: T0 + 900,
      };
      await store.commit('fx', 1, { effect: compensated });
      expect(await store.listEffects('fx')).toStrictEqual([compensated]);
      expect(await store.getEffect('fx', 'charge:1')).toStrictEqual(compensated);

      // The same key in another run is another effect.
      expect(await store.getEffect('fx-other', 'charge:1')).toBeUndefined();
      const elsewhere = effectRecord('fx-other', 'charge:1', { status: 'failed', error: '{}' });
      await store.commit('fx-other', 1, { effect: elsewhere });
      expect(await store.getEffect('fx-other', 'charge:1')).toStrictEqual(elsewhere);
      expect(await store.getEffect('fx', 'charge:1')).toStrictEqual(compensated);
    });

    it('the timeline never reorders executions: a failed then a resumed, completed run of one index stay in order', async () => {
      await create(runRecord('steps'));
      const first = stepRecord('steps', 1, { name: 'search', next: 'analyze' });
      const failed = stepRecord('steps', 2, {
        name: 'analyze',
        status: 'failed',
        attempts: 3,
        next: null,
        error: '{"name":"Error","message":"provider down"}',
      });
      const retried = stepRecord('steps', 2, {
        name: 'analyze',
        next: null,
        startedAt: T0 + 500,
        endedAt: T0 + 510,
      });
      // A failure ends the run's work under its lease: the retry runs under the next claim.
      await store.commit('steps', 1, { step: first });
      await store.commit('steps', 1, { step: failed });
      const epoch = await store.claimLease('steps', 1, {
        owner: 'resumer',
        pid: 2,
        host: 'h',
        expiresAt: T0 + 60_000,
      });
      expect(epoch).toBe(2);
      await store.commit('steps', 2, { step: retried });
      expect(await store.listSteps('steps')).toStrictEqual([first, failed, retried]);
    });

    it('an effect key the run never recorded is not mistaken for a recorded one: getEffect is undefined', async () => {
      await create(runRecord('keys'));
      await store.commit('keys', 1, { effect: effectRecord('keys', 'publish:a') });
      expect(await store.getEffect('keys', 'publish:b')).toBeUndefined();
      expect(await store.getEffect('keys', 'publish:A')).toBeUndefined();
      expect(await store.getEffect('nobody', 'publish:a')).toBeUndefined();
      expect((await store.getEffect('keys', 'publish:a'))?.key).toBe('publish:a');
    });

    it('the LLM journal keeps every field of a call, one row per (run, step index, position), in order', async () => {
      await create(runRecord('journal'));
      const failed = llmCall('journal', 1, {
        status: 'failed',
        response: null,
        error: '{"name":"LlmUnavailableError"}',
        tier: null,
        provider: null,
        model: null,
        costUsd: null,
      });
      await store.recordLlmCall(1, llmCall('journal', 0));
      await store.recordLlmCall(1, failed);
      expect(await store.getLlmCall('journal', 1, 1)).toStrictEqual(failed);
      // A later success at the same position replaces the failed row.
      const answered = llmCall('journal', 1, {
        streamed: true,
        degraded: true,
        updatedAt: T0 + 900,
      });
      await store.recordLlmCall(1, answered);
      await store.markLlmReplayed('journal', 1, 0, T0 + 1_000);
      expect(await store.listLlmCalls('journal')).toStrictEqual([
        llmCall('journal', 0, { replays: 1, updatedAt: T0 + 1_000 }),
        answered,
      ]);
      expect(await store.getLlmCall('journal', 2, 0)).toBeUndefined();
      expect(await store.listLlmCalls('nobody')).toStrictEqual([]);
    });

    it('C02: a journal write under a stale epoch throws LEASE_LOST and writes nothing', async () => {
      await create(runRecord('fenced'));
      const epoch = await store.claimLease('fenced', 1, claim('taker'));
      expect(epoch).toBe(2);
      const error = await rejection(store.recordLlmCall(1, llmCall('fenced', 0)));
      expect(isLeaseError(error)).toBe(true);
      expect((error as { code?: string }).code).toBe('LEASE_LOST');
      expect(await store.listLlmCalls('fenced')).toStrictEqual([]);
      await store.recordLlmCall(2, llmCall('fenced', 0));
      expect(await store.listLlmCalls('fenced')).toHaveLength(1);
    });

    it('tier state starts closed, and updates apply to what the last update wrote', async () => {
      expect(await store.readTierState('primary')).toBeUndefined();
      const opened = await store.updateTierState('primary', (s) => {
        expect(s).toStrictEqual({
          tier: 'primary',
          breaker: 'closed',
          failures: 0,
          openUntil: 0,
          probeOwner: null,
          probeUntil: 0,
          downUntil: 0,
          misconfigured: null,
          updatedAt: 0,
        });
        return { ...s, breaker: 'open', failures: 3, openUntil: T0 + 30_000, updatedAt: T0 };
      });
      await Promise.all(
        Array.from({ length: 5 }, () =>
          store.updateTierState('primary', (s) => ({ ...s, failures: s.failures + 1 })),
        ),
      );
      await store.updateTierState('quota', (s) => ({
        ...s,
        downUntil: T0 + 3_600_000,
        misconfigured: 'auth',
      }));
      expect(await store.readTierState('primary')).toStrictEqual({ ...opened, failures: 8 });
      expect(
        (await store.listTierStates()).map((t) => [t.tier, t.breaker, t.openUntil, t.downUntil]),
      ).toEqual([
        ['primary', 'open', T0 + 30_000, 0],
        ['quota', 'closed', 0, T0 + 3_600_000],
      ]);
    });
  });
}
