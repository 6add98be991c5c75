/**
 * Section 3: resuming. A run is killed (SIGKILL) in the middle of its step after 10, 1,000 or
 * 10,000 completed steps; a fresh process resumes it. Measured: milliseconds from that process's
 * start to the interrupted step beginning again. keel reads the newest snapshot and the patches
 * after it, so the figure should not grow with the run.
 */
import { copyFileSync, existsSync } from 'node:fs';
import { join } from 'node:path';
import { runChild } from '../children.ts';
import { alternate, row, withGoal, type Row } from '../lib.ts';

export async function resumeSection(dir: string, reps: number, sizes: readonly number[]) {
  const killed = new Map<number, string>();
  for (const completed of sizes) {
    const db = join(dir, `resume-${completed}.db`);
    const result = await runChild(['crash', db, String(completed)]).catch((error: Error) => error);
    if (!(result instanceof Error)) throw new Error('the crashing run printed a result');
    killed.set(completed, db);
  }
  let copies = 0;
  /** A copy of the killed run's files: every repetition resumes the same interrupted run. */
  const copy = (db: string) => {
    const target = `${db}.${++copies}.db`;
    copyFileSync(db, target);
    if (existsSync(`${db}-wal`)) copyFileSync(`${db}-wal`, `${target}-wal`);
    return target;
  };
  const contenders = Object.fromEntries(
    sizes.map((completed) => [
      String(completed),
      async () => {
        const out = await runChild(['resume', copy(killed.get(completed)!)]);
        return out.msToFirstNewStep as number;
      },
    ]),
  );
  const results = await alternate(reps, contenders);
  const first = { subject: `${sizes[0]} steps done`, samples: results[String(sizes[0])]! };
  const rows: Row[] = [];
  for (const completed of sizes) {
    const r = row(
      {
        section: '3. resume',
        subject: `keel, ${completed.toLocaleString('en')} steps done`,
        metric: 'process start to first new step',
        unit: 'ms',
        samples: results[String(completed)]!,
      },
      completed === sizes[0] ? undefined : first,
    );
    rows.push(completed === sizes[0] ? r : withGoal(r, '≤ 2x', (x) => x.ratio! <= 2));
  }
  return rows;
}
