/**
 * The benchmark's child processes, bundled (see tests/torture/bundle.ts) so that they start in a
 * tenth of a second. Each mode prints one JSON line for the parent.
 *
 *   crash <db> <completed>            start a run, SIGKILL itself at step <completed> (from 0)
 *   resume <db>                       resume it; print ms from process start to that step beginning
 *   drain <db> <concurrency>          print `ready`, wait for a line on stdin, drain the queue
 *   queue-memory <db> <runs>          enqueue <runs> runs and drain them; print peak RSS
 *   state-memory <db> <megabytes>     run a workflow with a state of that size; print peak RSS
 *   baseline <db>                     open the engine and nothing else; print peak RSS
 */
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { createInterface } from 'node:readline';
import { openEngine, workflow } from '../adapters/index.ts';
import { noop, resumable, RUN_ID } from './workflows.ts';

const [mode, db, arg] = process.argv.slice(2) as [string, string, string | undefined];
const n = Number(arg ?? 0);
/** The bundle has no migrations folder beside it: the parent says where the repository is. */
const migrationsFolder = join(process.env.KEEL_BENCH_ROOT ?? process.cwd(), 'migrations');
const open = (path: string) => openEngine({ db: path, migrationsFolder });
const say = (fields: object) => process.stdout.write(`${JSON.stringify(fields)}\n`);
/**
 * The peak resident set of this process image, from VmHWM: getrusage's maxRSS survives execve, so a
 * child spawned by a large parent would report the parent's peak.
 */
const peakRss = () => {
  const match = /^VmHWM:\s*(\d+) kB$/m.exec(readFileSync('/proc/self/status', 'utf8'));
  return match ? Number(match[1]) * 1024 : process.resourceUsage().maxRSS * 1024;
};

async function main(): Promise<void> {
  switch (mode) {
    case 'crash': {
      const wf = resumable(() => process.kill(process.pid, 'SIGKILL'));
      await open(db).start(wf, { i: 0, at: n, stop: n + 3, note: '' }, { id: RUN_ID });
      throw new Error('the run should have died at its step');
    }
    case 'resume': {
      const wf = resumable(() => {
        say({ msToFirstNewStep: performance.now() });
        process.exit(0);
      });
      await open(db).register(wf).resume(RUN_ID);
      throw new Error('the resumed run never reached its first new step');
    }
    case 'drain': {
      const engine = open(db).register(noop);
      say({ ready: true });
      const lines = createInterface({ input: process.stdin });
      await new Promise((go) => lines.once('line', go));
      lines.close();
      const report = await engine.work({ concurrency: n, untilIdle: true, pollMs: 50 });
      say({ completed: report.completed, failed: report.failed });
      await engine.close();
      return;
    }
    case 'queue-memory': {
      const engine = open(db).register(noop);
      for (let i = 0; i < n; i++) await engine.enqueue(noop, { n: i });
      const queued = peakRss();
      const report = await engine.work({ concurrency: 8, untilIdle: true, pollMs: 50 });
      if (report.completed !== n) throw new Error(`drained ${report.completed} of ${n} runs`);
      say({ afterEnqueue: queued, peakRss: peakRss() });
      await engine.close();
      return;
    }
    case 'state-memory': {
      // A state of many small records, as an agent's collected documents would be.
      const records = Math.round((n * 1024 * 1024) / 1024);
      const big = workflow<{ docs: { id: number; text: string }[]; seen: number }>('bench-big', {
        version: 1,
      })
        .step('read', (state) => {
          state.seen += 1;
        })
        .step('mark', (state) => {
          state.docs[0]!.text = 'changed';
          state.seen += 1;
        })
        .step('finish', (state) => {
          state.seen += 1;
        });
      const docs = Array.from({ length: records }, (_, id) => ({ id, text: 'y'.repeat(1000) }));
      const engine = open(db);
      const result = await engine.start(big, { docs, seen: 0 });
      if (result.status !== 'completed') throw new Error(`the run ended ${result.status}`);
      say({ peakRss: peakRss() });
      await engine.close();
      return;
    }
    case 'baseline': {
      const engine = open(db).register(noop);
      say({ peakRss: peakRss() });
      await engine.close();
      return;
    }
    default:
      throw new Error(`unknown mode ${mode}`);
  }
}

await main();
