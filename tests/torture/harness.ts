/**
 * Crash torture: real `keel` processes work batches of runs on SQLite files and are killed with
 * SIGKILL, over and over, at moments a seed chooses: at random times, and at the engine's named
 * crash points (before, inside and after each commit, before and after an effect's `run`, inside a
 * rollback). Now and then eight `keel resume --all` and four `keel worker`s race over one database
 * while one of them is stopped past its lease and then let go.
 *
 * Every run is also run once without a crash, in this process, against a sink and an LLM server of
 * its own: the reference. At the end each tortured run must have reached the reference's status
 * and state, applied each of the reference's effects exactly once (a `run` called again only
 * before its outcome was recorded, with the same key and value), compensated the same effects,
 * never re-sent a prompt whose answer was recorded, and the databases must pass
 * `PRAGMA integrity_check`.
 */
import Database from 'better-sqlite3';
import { spawn } from 'node:child_process';
import { mkdirSync, rmSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { isDeepStrictEqual } from 'node:util';
import { openEngine, type Engine, type LlmConfig } from 'keel';
import { KEEL_BIN, ROOT } from '../support/index.ts';
import { bundleChild } from './bundle.ts';
import { startServices, type Services } from './services.ts';
import { all, type Mix } from './workflows.ts';

export type TortureOptions = {
  /** Stop starting new batches once this many processes were killed. */
  kills: number;
  seed: number;
  /** A folder for the databases; it must exist and be empty. */
  dir: string;
  /** Databases worked side by side (default 2). */
  lanes?: number;
  /** Runs enqueued per batch (default 10). */
  batch?: number;
  /** Every this many rounds, a race of 8 resumers and 4 workers on lane 0 (default 25; 0: never). */
  raceEvery?: number;
  /** Lease of the tortured processes (default 3 s), so that a stopped owner loses it. */
  leaseMs?: number;
  log?: (line: string) => void;
};

export type TortureReport = {
  seed: number;
  kills: number;
  /** Kills at a named crash point, and at a random moment after the process began work. */
  crashPointKills: number;
  timedKills: number;
  processes: number;
  races: number;
  /** Owners stopped past their lease and then continued. */
  stalls: number;
  runs: number;
  effectsApplied: number;
  /** `run` called again before its outcome was recorded (allowed: the sink honours keys). */
  effectReruns: number;
  compensations: number;
  llmRequests: number;
  duplicates: number;
  lost: number;
  mismatched: number;
  integrity: string;
  seconds: number;
  /** What went wrong, one line each; empty when the run passed. */
  failures: string[];
};

type Kind = keyof typeof all;

type Planned = { id: string; kind: Kind; input: Mix; runId: string };

type Expected = {
  status: string;
  state: unknown;
  /** Each recorded effect's status by key: what a rollback that stopped says is still applied. */
  recorded: Record<string, string>;
  effects: string[];
  compensated: string[];
};

const recordedOf = (view: { effects: { key: string; status: string }[] }) =>
  Object.fromEntries(view.effects.map((e) => [e.key, e.status]));

const FINAL = ['completed', 'rolled_back', 'compensation_failed'];

/** Crash points the engine names; `@n` picks the nth time a process reaches one. */
export const CRASH_POINTS = [
  'effect:before-intent',
  'effect:after-run',
  'compensation:after-run',
  ...['step', 'checkpoint', 'effect-record', 'attempt', 'resume', 'wait', 'rollback']
    .concat(['compensation-record'])
    .flatMap((label) =>
      ['before-commit', 'inside-commit', 'after-commit'].map((w) => `${label}:${w}`),
    ),
];

/** A small seeded generator (xorshift32): the same seed gives the same torture. */
export function seeded(seed: number): () => number {
  let x = (seed ^ 0x5bd1e995) >>> 0 || 1;
  return () => {
    x ^= x << 13;
    x >>>= 0;
    x ^= x >>> 17;
    x ^= x << 5;
    x >>>= 0;
    return x / 0x100000000;
  };
}

function llmConfig(url: string): LlmConfig {
  return {
    tiers: [{ name: 'fake', provider: 'openai-compatible', baseURL: url, model: 'torture' }],
    degraded: false,
  };
}

function makeInput(id: string, kind: Kind, rand: () => number): Mix {
  const n = 1 + Math.floor(rand() * 8);
  const base: Mix = { id, n, log: [], total: 0, squares: [], answers: [], receipts: [] };
  if (kind === 'rollback') base.mode = rand() < 0.4 ? 'stuck' : 'flaky';
  return base;
}

function pickKind(rand: () => number): Kind {
  const r = rand();
  if (r < 0.4) return 'linear';
  if (r < 0.65) return 'cycle';
  if (r < 0.8) return 'waits';
  return 'rollback';
}

type Child = { code: number | null; signal: NodeJS.Signals | null; stderr: string };

/**
 * How a process that was not killed may end: 0, or 1 when a run it carried on ended failed or
 * compensation_failed (by design here) or another process held a run it wanted. Never with a
 * stack trace, which would mean an error keel did not expect.
 */
function acceptable(child: Child): boolean {
  if (/^\s+at .+:\d+:\d+\)?$/m.test(child.stderr)) return false;
  return child.code === 0 || child.code === 1;
}

export async function torture(options: TortureOptions): Promise<TortureReport> {
  const started = Date.now();
  const lanes = options.lanes ?? 2;
  const batchSize = options.batch ?? 10;
  const raceEvery = options.raceEvery ?? 25;
  const leaseMs = options.leaseMs ?? 3000;
  const log = options.log ?? (() => {});
  const report: TortureReport = {
    seed: options.seed,
    kills: 0,
    crashPointKills: 0,
    timedKills: 0,
    processes: 0,
    races: 0,
    stalls: 0,
    runs: 0,
    effectsApplied: 0,
    effectReruns: 0,
    compensations: 0,
    llmRequests: 0,
    duplicates: 0,
    lost: 0,
    mismatched: 0,
    integrity: 'ok',
    seconds: 0,
    failures: [],
  };

  const laneDb = (lane: number) => join(options.dir, `lane-${lane}.db`);
  const readers = new Map<number, Database.Database>();
  const reader = (lane: number): Database.Database | undefined => {
    let db = readers.get(lane);
    if (!db) {
      try {
        db = new Database(laneDb(lane), { readonly: true, fileMustExist: true, timeout: 5000 });
      } catch {
        return undefined;
      }
      readers.set(lane, db);
    }
    return db;
  };
  const laneOf = (id: string) => Number(/^L(\d+)/.exec(id)?.[1] ?? -1);

  const world = await startServices((id) => reader(laneOf(id)));
  const ref = await startServices();
  const configFile = join(options.dir, 'keel.config.json');
  writeFileSync(configFile, JSON.stringify({ llm: llmConfig(world.llmUrl) }));
  const env = {
    ...process.env,
    KEEL_CONFIG: configFile,
    OPENAI_API_KEY: 'torture-key',
    ANTHROPIC_API_KEY: '',
    KEEL_LEASE_MS: String(leaseMs),
    TORTURE_SINK: world.sinkUrl,
    KEEL_LOG: 'info',
  };

  // The reference: the same inputs, run once without a crash, one batch at a time.
  mkdirSync(join(options.dir, 'reference'), { recursive: true });
  process.env.TORTURE_SINK = ref.sinkUrl;
  const refEngine = openEngine({
    db: join(options.dir, 'reference', 'reference.db'),
    llm: llmConfig(ref.llmUrl),
  });
  const expected = new Map<string, Expected>();
  let refQueue = Promise.resolve();
  const reference = (batch: Planned[]) =>
    (refQueue = refQueue.then(() => runReference(refEngine, ref, batch, expected)));

  const laneEngines = new Map<number, Engine>();
  const laneEngine = (lane: number) => {
    let engine = laneEngines.get(lane);
    if (!engine) {
      engine = openEngine({ db: laneDb(lane), llm: llmConfig(world.llmUrl) });
      laneEngines.set(lane, engine);
    }
    return engine;
  };

  const planned: Planned[] = [];

  const childBin = await bundleChild();

  /** `keel ARGS` when `args` starts with `keel`, else the bundled child with a role. */
  const spawnKeel = (
    lane: number,
    args: string[],
    extraEnv: Record<string, string> = {},
  ): { done: Promise<Child>; pid: number; active: Promise<void>; kill: () => void } => {
    const argv =
      args[0] === 'keel' ? [KEEL_BIN, ...args.slice(1), '--db', laneDb(lane)] : [childBin, ...args];
    const child = spawn(process.execPath, argv, {
      env: { ...env, KEEL_DB: laneDb(lane), TORTURE_ROOT: ROOT, ...extraEnv },
      stdio: ['ignore', 'ignore', 'pipe'],
    });
    report.processes += 1;
    let stderr = '';
    let markActive: () => void = () => {};
    const active = new Promise<void>((resolve) => (markActive = resolve));
    child.stderr.setEncoding('utf8');
    child.stderr.on('data', (chunk: string) => {
      stderr = (stderr + chunk).slice(-4000);
      markActive();
    });
    const done = new Promise<Child>((resolve) => {
      child.on('close', (code, signal) => {
        markActive();
        resolve({ code, signal, stderr });
      });
    });
    return { done, pid: child.pid ?? -1, active, kill: () => child.kill('SIGKILL') };
  };

  /** One process with one kill plan; resolves when it is gone. */
  const round = async (lane: number, batch: Planned[], r: () => number) => {
    const statuses = statusesOf(lane, batch);
    const toRollBack = batch.filter((p) => needsRollback(p, statuses.get(p.id)));
    let args: string[];
    const pick = r();
    if (toRollBack.length > 0 && pick < 0.3) {
      args = ['rollback', toRollBack[Math.floor(r() * toRollBack.length)]!.runId];
    } else if (pick < 0.75) {
      args = ['worker'];
    } else {
      args = ['resume'];
    }
    // Most processes die at a random moment once they have begun work, a third at a named crash
    // point (when they reach it), and a few are left to finish.
    const plan = r();
    const crashAt =
      plan < 0.35
        ? `${CRASH_POINTS[Math.floor(r() * CRASH_POINTS.length)]}@${1 + Math.floor(r() * 3)}`
        : undefined;
    const delayMs = plan >= 0.35 && plan < 0.95 ? Math.floor(r() * 400) : undefined;
    const child = spawnKeel(lane, args, crashAt ? { KEEL_CRASH_AT: crashAt } : {});
    let killedByUs = false;
    let timer: NodeJS.Timeout | undefined;
    if (delayMs !== undefined) {
      void child.active.then(() => {
        timer = setTimeout(() => {
          killedByUs = true;
          child.kill();
        }, delayMs);
      });
    }
    const hang = setTimeout(() => {
      report.failures.push(`lane ${lane}: \`${args.join(' ')}\` was still running after 60 s`);
      child.kill();
    }, 60_000);
    const t0 = Date.now();
    const result = await child.done;
    clearTimeout(timer);
    clearTimeout(hang);
    if (process.env.TORTURE_DEBUG) {
      log(
        `lane ${lane} ${args.join(' ')} ${crashAt ?? delayMs ?? 'free'} -> ${result.signal ?? result.code} in ${Date.now() - t0} ms`,
      );
    }
    if (result.signal === 'SIGKILL') {
      report.kills += 1;
      if (killedByUs) report.timedKills += 1;
      else report.crashPointKills += 1;
    } else if (!acceptable(result)) {
      report.failures.push(
        `lane ${lane}: \`${args.join(' ')}\` exited ${result.code}: ${result.stderr.trim().split('\n').slice(-3).join(' / ')}`,
      );
    }
  };

  /** Eight resumers and four workers at once; some killed, one worker stopped past its lease. */
  const race = async (lane: number, r: () => number) => {
    report.races += 1;
    // Every fourth race (the first included) is fought by the `keel` command itself; the others by
    // the bundled child, which makes the same engine calls and starts in a fraction of the time.
    const cli = report.races % 4 === 1;
    const resume = cli ? ['keel', 'resume', '--all'] : ['resume'];
    const worker = cli
      ? ['keel', 'worker', '--until-idle', '--concurrency', '4', '--poll', '50']
      : ['worker'];
    const children = [
      ...Array.from({ length: 8 }, () => spawnKeel(lane, resume)),
      ...Array.from({ length: 4 }, () => spawnKeel(lane, worker)),
    ];
    const stalled = children[8 + Math.floor(r() * 4)]!;
    const timers: NodeJS.Timeout[] = [];
    void stalled.active.then(() => {
      timers.push(
        setTimeout(() => {
          try {
            process.kill(stalled.pid, 'SIGSTOP');
          } catch {
            return; // already gone
          }
          report.stalls += 1;
          timers.push(setTimeout(() => process.kill(stalled.pid, 'SIGCONT'), leaseMs * 2));
        }, 100),
      );
    });
    for (const child of children) {
      if (child === stalled || r() < 0.6) continue;
      const delay = Math.floor(r() * 800);
      void child.active.then(() => timers.push(setTimeout(child.kill, delay)));
    }
    const hang = setTimeout(() => {
      report.failures.push(`lane ${lane}: a racing process was still running after 90 s`);
      for (const c of children) c.kill();
    }, 90_000);
    const results = await Promise.all(children.map((c) => c.done));
    clearTimeout(hang);
    for (const t of timers) clearTimeout(t);
    for (const result of results) {
      if (result.signal === 'SIGKILL') {
        report.kills += 1;
        report.timedKills += 1;
      } else if (!acceptable(result)) {
        report.failures.push(
          `lane ${lane}: a racing process exited ${result.code}: ${result.stderr.trim().split('\n').slice(-3).join(' / ')}`,
        );
      }
    }
  };

  /**
   * A run the workflow rolls back that stopped on its way: killed after it failed, or in the middle
   * of its compensations. `compensation_failed` too, where the reference rolled back completely: a
   * kill during a compensation can use up one of its attempts, and the user's answer is to run the
   * rollback again.
   */
  const needsRollback = (p: Planned, status: string | undefined) => {
    if (status === 'failed' || status === 'compensating') return true;
    if (status !== 'compensation_failed') return false;
    const want = expected.get(p.id);
    if (want?.status === 'rolled_back') return true;
    // Stopped at another effect than the reference did (a compensation whose attempts a kill, or
    // a connection the sink dropped, used up): run the rollback again, as its hint says.
    const rows = reader(laneOf(p.id))
      ?.prepare('SELECT key, status FROM effects WHERE run_id = ?')
      .all(p.runId) as { key: string; status: string }[] | undefined;
    const recorded = Object.fromEntries((rows ?? []).map((r) => [r.key, r.status]));
    return want !== undefined && !isDeepStrictEqual(recorded, want.recorded);
  };

  const statusesOf = (lane: number, batch: Planned[]) => {
    const db = reader(lane);
    const out = new Map<string, string>();
    if (!db) return out;
    const get = db.prepare('SELECT status FROM runs WHERE id = ?');
    for (const p of batch) {
      const row = get.get(p.runId) as { status: string } | undefined;
      out.set(p.id, row?.status ?? 'missing');
    }
    return out;
  };
  const settled = (lane: number, batch: Planned[]) => {
    const statuses = statusesOf(lane, batch);
    return batch.every((p) => {
      const want = expected.get(p.id)?.status;
      const got = statuses.get(p.id);
      if (got === undefined || !FINAL.includes(got) || needsRollback(p, got)) return false;
      return want === undefined || want === got;
    });
  };

  const enqueueBatch = async (lane: number, b: number, r: () => number): Promise<Planned[]> => {
    const engine = laneEngine(lane);
    const batch: Planned[] = [];
    for (let i = 0; i < batchSize; i++) {
      const id = `L${lane}b${b}r${i}`;
      const kind = pickKind(r);
      const input = makeInput(id, kind, r);
      if (input.mode === 'stuck') {
        world.stuck.add(id);
        ref.stuck.add(id);
      }
      const { runId } = await engine.enqueue(all[kind], input);
      batch.push({ id, kind, input, runId });
    }
    planned.push(...batch);
    // The signals the `t-wait` runs wait for arrive a little later, while processes work.
    const delay = Math.floor(r() * 1500);
    setTimeout(() => {
      for (const p of batch) {
        if (p.kind !== 'waits') continue;
        void engine.signal(p.runId, 'go', { n: p.input.n, from: 'harness' }).catch((error) => {
          report.failures.push(`signal to ${p.id}: ${(error as Error).message}`);
        });
      }
    }, delay);
    return batch;
  };

  const laneLoop = async (lane: number) => {
    const r = seeded(options.seed * 31 + lane + 1);
    let turns = 0;
    for (let b = 0; report.kills < options.kills; b++) {
      const batch = await enqueueBatch(lane, b, r);
      await reference(batch);
      let tries = 0;
      while (!settled(lane, batch) && report.kills < options.kills) {
        if (++tries > 150) {
          report.failures.push(`lane ${lane}: batch ${b} not settled after 150 processes`);
          return;
        }
        turns += 1;
        if (lane === 0 && raceEvery > 0 && turns % raceEvery === 0) {
          await race(lane, r);
        } else {
          await round(lane, batch, r);
        }
      }
      if (report.kills % 50 < batchSize) log(`kills ${report.kills}, runs ${planned.length}`);
    }
  };

  try {
    await Promise.all(Array.from({ length: lanes }, (_, lane) => laneLoop(lane)));
    await refQueue;
    // Crashes over: finish what is left, with no kill, then judge.
    for (let lane = 0; lane < lanes; lane++) {
      const batch = planned.filter((p) => laneOf(p.id) === lane);
      for (let i = 0; i < 20 && !settled(lane, batch); i++) {
        const statuses = statusesOf(lane, batch);
        const left = batch.filter((p) => needsRollback(p, statuses.get(p.id)));
        for (const p of left) await spawnKeel(lane, ['rollback', p.runId]).done;
        await spawnKeel(lane, ['worker']).done;
      }
    }
    await judge(report, planned, expected, world, laneEngine);
    for (let lane = 0; lane < lanes; lane++) {
      const db = reader(lane);
      const result = db?.pragma('integrity_check', { simple: true });
      if (result !== 'ok') {
        report.integrity = String(result);
        report.failures.push(`lane ${lane}: integrity_check says ${String(result)}`);
      }
    }
  } finally {
    for (const engine of laneEngines.values()) await engine.close();
    await refEngine.close();
    for (const db of readers.values()) db.close();
    await world.close();
    await ref.close();
    rmSync(childBin, { force: true });
  }
  report.seconds = Math.round((Date.now() - started) / 1000);
  return report;
}

async function runReference(
  engine: Engine,
  ref: Services,
  batch: Planned[],
  expected: Map<string, Expected>,
): Promise<void> {
  const ids = new Map<string, Planned>();
  for (const p of batch) {
    const { runId } = await engine.enqueue(all[p.kind], p.input);
    ids.set(runId, p);
    if (p.kind === 'waits') await engine.signal(runId, 'go', { n: p.input.n, from: 'harness' });
  }
  await engine.work({ untilIdle: true, pollMs: 20 });
  const applied = keysByRun(ref.applied.values());
  const compensated = keysByRun([...ref.compensations.values()].filter((c) => c.done));
  for (const [runId, p] of ids) {
    const view = await engine.get(runId);
    expected.set(p.id, {
      status: view.status,
      state: view.state,
      recorded: recordedOf(view),
      effects: applied.get(p.id) ?? [],
      compensated: compensated.get(p.id) ?? [],
    });
  }
}

/** The keys of effects (or compensations) at a sink, by the input id of their run, sorted. */
function keysByRun(entries: Iterable<{ id: string; key: string }>): Map<string, string[]> {
  const byRun = new Map<string, string[]>();
  for (const { id, key } of entries) byRun.set(id, [...(byRun.get(id) ?? []), key]);
  for (const keys of byRun.values()) keys.sort();
  return byRun;
}

async function judge(
  report: TortureReport,
  planned: Planned[],
  expected: Map<string, Expected>,
  world: Services,
  laneEngine: (lane: number) => Engine,
): Promise<void> {
  report.runs = planned.length;
  report.effectsApplied = world.applied.size;
  report.effectReruns = world.reruns;
  report.compensations = [...world.compensations.values()].filter((c) => c.done).length;
  report.llmRequests = [...world.prompts.values()].reduce((a, b) => a + b, 0);
  report.duplicates += world.violations.length;
  report.failures.push(...world.violations);
  const applied = keysByRun(world.applied.values());
  const compensatedByRun = keysByRun([...world.compensations.values()].filter((c) => c.done));
  for (const p of planned) {
    const want = expected.get(p.id);
    if (!want) {
      report.lost += 1;
      report.failures.push(`${p.id}: no reference outcome`);
      continue;
    }
    const lane = Number(/^L(\d+)/.exec(p.id)?.[1]);
    const view = await laneEngine(lane).get(p.runId);
    if (view.status !== want.status) {
      report.lost += 1;
      report.failures.push(
        `${p.id} (${p.kind}, run ${p.runId}): ${view.status}, expected ${want.status}`,
      );
      continue;
    }
    if (!isDeepStrictEqual(view.state, want.state)) {
      report.mismatched += 1;
      report.failures.push(
        `${p.id} (${p.kind}, run ${p.runId}): final state differs from the reference: ${JSON.stringify(view.state)} vs ${JSON.stringify(want.state)}`,
      );
    }
    if (!isDeepStrictEqual(recordedOf(view), want.recorded)) {
      report.mismatched += 1;
      report.failures.push(
        `${p.id} (${p.kind}, run ${p.runId}): effects recorded as ${JSON.stringify(recordedOf(view))}, the reference ${JSON.stringify(want.recorded)}`,
      );
    }
    const effects = applied.get(p.id) ?? [];
    const extra = effects.filter((k) => !want.effects.includes(k));
    const missing = want.effects.filter((k) => !effects.includes(k));
    if (extra.length > 0) {
      report.duplicates += extra.length;
      report.failures.push(`${p.id}: effects the reference never applied: ${extra.join(', ')}`);
    }
    if (missing.length > 0) {
      report.lost += 1;
      report.failures.push(`${p.id}: effects never applied: ${missing.join(', ')}`);
    }
    const compensated = compensatedByRun.get(p.id) ?? [];
    if (!isDeepStrictEqual(compensated, want.compensated)) {
      report.mismatched += 1;
      report.failures.push(
        `${p.id}: compensated ${compensated.join(', ') || 'nothing'}, the reference ${want.compensated.join(', ') || 'nothing'}`,
      );
    }
  }
}
