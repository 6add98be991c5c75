/**
 * The process the torture harness starts and kills, most of the time: `worker`, `resume` or
 * `rollback RUN_ID`, the same engine calls as `keel worker --until-idle`, `keel resume --all` and
 * `keel rollback`, with the torture workflows registered. The harness bundles it into one file
 * (see ./bundle.ts) so that a process starts in a fraction of the time the `keel` command takes
 * to load its TypeScript, and two thousand kills fit in minutes; the races use `keel` itself.
 *
 * It writes one line to stderr when it begins work on a run, which is when a timed kill starts
 * counting, and exits 0, or 1 when a run it carried on ended other than completed or rolled back.
 */
import { join } from 'node:path';
import { openEngine, type RunEvent } from 'keel';
import { all } from './workflows.ts';

const [role, runId] = process.argv.slice(2);
const root = process.env.TORTURE_ROOT;
if (!root || !process.env.KEEL_DB) throw new Error('TORTURE_ROOT and KEEL_DB must be set');

let begun = false;
const engine = openEngine({
  migrationsFolder: join(root, 'migrations'),
  onEvent: (event: RunEvent) => {
    if (begun) return;
    begun = true;
    process.stderr.write(`${event.type} ${event.runId}\n`);
  },
});
for (const wf of Object.values(all)) engine.register(wf);

const ok = (status: string) => status === 'completed' || status === 'rolled_back';
let code = 0;
if (role === 'worker') {
  await engine.work({ untilIdle: true, concurrency: 4, pollMs: 50 });
} else if (role === 'resume') {
  const results = await engine.resumeAll();
  if (results.some((r) => !('status' in r) || !ok(r.status))) code = 1;
} else if (role === 'rollback' && runId) {
  const result = await engine.rollback(runId);
  if (!ok(result.status)) code = 1;
} else {
  throw new Error(`unknown role ${role}`);
}
await engine.close();
process.exit(code);
