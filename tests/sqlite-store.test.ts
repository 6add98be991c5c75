/** The store conformance suite against the SQLite store, on real database files. */
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { isLeaseError } from '../engine/errors.ts';
import type { RunRecord } from '../engine/store.ts';
import { DUE_RUNS_SQL, openSqliteStore } from '../adapters/sqlite/store.ts';
import { openEngine, workflow } from '../adapters/index.ts';
import { storeConformance } from './store-conformance.ts';
import { tempDir } from './support/index.ts';

storeConformance('SqliteStore on a file', async () => {
  const dir = mkdtempSync(join(tmpdir(), 'keel-store-'));
  const store = openSqliteStore(join(dir, 'keel.db'));
  return {
    store,
    cleanup: async () => {
      await store.close();
      rmSync(dir, { recursive: true, force: true });
    },
  };
});

describe('SqliteStore across connections to one file', () => {
  const dir = tempDir('keel-store-conn-');
  const T0 = 1_760_000_000_000;
  const run: RunRecord = {
    id: 'shared',
    workflow: 'conformance',
    version: 1,
    fingerprint: 'fp',
    graph: '{"nodes":[]}',
    module: null,
    status: 'running',
    input: '{}',
    cursor: 'first',
    cursorAttempts: 0,
    stepCount: 0,
    seq: 1,
    snapshotSeq: 1,
    snapshotBytes: 2,
    patchBytes: 0,
    patchCount: 0,
    error: null,
    options: '{}',
    epoch: 1,
    lease: { owner: 'first', pid: 1, host: 'h', expiresAt: T0 + 1_000 },
    createdAt: T0,
    updatedAt: T0,
    endedAt: null,
    cancelRequested: false,
  };

  it('C02: a connection whose epoch another connection superseded cannot write', async () => {
    const file = join(dir, 'keel.db');
    const owner = openSqliteStore(file);
    const taker = openSqliteStore(file);
    try {
      await owner.createRun(run, {
        runId: 'shared',
        seq: 1,
        kind: 'snapshot',
        step: null,
        data: '{}',
        createdAt: T0,
      });
      expect(
        await taker.claimLease('shared', 1, {
          owner: 'second',
          pid: 2,
          host: 'h',
          expiresAt: T0 + 5_000,
        }),
      ).toBe(2);
      let refused: unknown;
      try {
        await owner.commit('shared', 1, {
          run: { seq: 2, cursor: null, status: 'completed' },
          checkpoint: {
            runId: 'shared',
            seq: 2,
            kind: 'patch',
            step: 'first',
            data: '[]',
            createdAt: T0,
          },
        });
      } catch (error) {
        refused = error;
      }
      expect(isLeaseError(refused)).toBe(true);
      expect((refused as { code?: string }).code).toBe('LEASE_LOST');
      expect(await owner.renewLease('shared', 1, T0 + 9_000)).toBe(false);
      const seen = await owner.getRun('shared');
      expect(seen?.status).toBe('running');
      expect(seen?.seq).toBe(1);
      expect(seen?.lease?.owner).toBe('second');
      expect((await taker.loadCheckpoints('shared', 0)).map((c) => c.seq)).toStrictEqual([1]);
    } finally {
      await owner.close();
      await taker.close();
    }
  });
});

describe("SqliteStore's look at the queue", () => {
  const dir = tempDir('keel-store-queue-');
  const noop = workflow<{ n: number }>('queue-look', { version: 1 }).step('only', (state) => {
    state.n += 1;
  });

  it('reads due entries in claim order from queue_ready_idx, stopping at its limit, without a sort', async () => {
    const db = join(dir, 'look.db');
    const engine = openEngine({ db });
    const low = await engine.enqueue(noop, { n: 1 }, { priority: 0 });
    const high = await engine.enqueue(noop, { n: 2 }, { priority: 5 });
    const later = await engine.enqueue(noop, { n: 3 }, { priority: 9, delay: 60_000 });
    const second = await engine.enqueue(noop, { n: 4 }, { priority: 0 });
    await engine.close();

    const store = openSqliteStore(db);
    try {
      const due = await store.dueRuns(Date.now(), 2);
      expect(due.map((e) => e.runId)).toEqual([high.runId, low.runId]);
      const all = await store.dueRuns(Date.now(), 10);
      expect(all.map((e) => e.runId)).toEqual([high.runId, low.runId, second.runId]);
      const laterEntry = await store.getQueueEntry(later.runId);
      expect(await store.nextDueAt()).toBe(
        Math.min(...all.map((e) => e.dueAt!), laterEntry!.dueAt!),
      );
      const plan = store.sqlite
        .prepare(`EXPLAIN QUERY PLAN ${DUE_RUNS_SQL}`)
        .all(Date.now(), 10) as { detail: string }[];
      expect(plan.map((p) => p.detail)).toEqual(['SCAN queue USING INDEX queue_ready_idx']);
    } finally {
      await store.close();
    }
  });
});
