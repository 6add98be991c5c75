/**
 * `npm run torture -- --kills 2000 --seed 7`: the crash torture of ./harness.ts, with its figures
 * on stdout and the exit status 1 if any run was lost, mismatched or duplicated something.
 */
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { parseArgs } from 'node:util';
import { torture } from './harness.ts';

const USAGE = `usage: npm run torture -- [--kills N] [--seed S] [--lanes N] [--batch N] [--race-every N] [--keep] [--json]
  --kills N       stop starting new batches once N processes were killed (default 200)
  --seed S        the seed that picks every input and every kill (default: a random one, printed)
  --lanes N       databases worked side by side (default 2)
  --batch N       runs enqueued per batch (default 10)
  --race-every N  a race of 8 resumers and 4 workers every N turns of the first lane (0: never)
  --keep          keep the databases even when the torture passes
  --json          print the report as JSON`;

let parsed;
try {
  parsed = parseArgs({
    options: {
      kills: { type: 'string', default: '200' },
      seed: { type: 'string' },
      lanes: { type: 'string', default: '2' },
      batch: { type: 'string', default: '10' },
      'race-every': { type: 'string', default: '25' },
      keep: { type: 'boolean', default: false },
      json: { type: 'boolean', default: false },
      help: { type: 'boolean', short: 'h', default: false },
    },
  });
} catch (error) {
  console.error(`torture: ${(error as Error).message}\n${USAGE}`);
  process.exit(2);
}
const { values } = parsed;
if (values.help) {
  console.log(USAGE);
  process.exit(0);
}

function count(name: string, text: string | undefined, least = 0): number {
  const n = Number(text);
  if (text === undefined || text.trim() === '' || !Number.isSafeInteger(n) || n < least) {
    console.error(
      `torture: --${name} must be a whole number${least > 0 ? ` of at least ${least}` : ''}, got "${text}"`,
    );
    process.exit(2);
  }
  return n;
}

const seed =
  values.seed === undefined ? Math.floor(Math.random() * 1e9) : count('seed', values.seed);
const kills = count('kills', values.kills, 1);
const lanes = count('lanes', values.lanes, 1);
const batch = count('batch', values.batch, 1);
const raceEvery = count('race-every', values['race-every']);
const dir = mkdtempSync(join(tmpdir(), 'keel-torture-'));
console.error(`torture: seed ${seed}, ${kills} kills, databases in ${dir}`);
const report = await torture({
  kills,
  seed,
  dir,
  lanes,
  batch,
  raceEvery,
  log: (line) => console.error(`torture: ${line}`),
});
const passed = report.failures.length === 0;
if (values.json) {
  console.log(JSON.stringify(report, null, 2));
} else {
  const rows: [string, number | string][] = [
    ['kills (SIGKILL)', report.kills],
    ['  at a named crash point', report.crashPointKills],
    ['  at a random moment', report.timedKills],
    ['processes started', report.processes],
    ['races (8 resumers + 4 workers)', report.races],
    ['owners stopped past their lease', report.stalls],
    ['runs', report.runs],
    ['effects applied', report.effectsApplied],
    ['effect runs repeated before their record', report.effectReruns],
    ['compensations applied', report.compensations],
    ['LLM requests', report.llmRequests],
    ['duplicates', report.duplicates],
    ['lost runs', report.lost],
    ['mismatched states', report.mismatched],
    ['integrity_check', report.integrity],
    ['seconds', report.seconds],
  ];
  for (const [label, value] of rows) console.log(`${label.padEnd(42)} ${value}`);
  for (const failure of report.failures) console.log(`FAIL ${failure}`);
  console.log(
    passed
      ? `passed: seed ${seed}`
      : `FAILED: replay with npm run torture -- --kills ${kills} --seed ${seed} --lanes ${values.lanes} --batch ${values.batch} --race-every ${values['race-every']}`,
  );
}
if (passed && !values.keep) rmSync(dir, { recursive: true, force: true });
else console.error(`torture: databases kept in ${dir}`);
process.exit(passed ? 0 : 1);
