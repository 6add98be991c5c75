/**
 * keel's benchmark: one table comparing keel with the SQLite floor and with its peers, printed and
 * written as JSON and Markdown under bench/results/ (not committed).
 *
 *   npm run bench [-- --quick] [-- --only steps,resume,router,queue,memory] [-- --reps N]
 */
import { mkdirSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { cpus, tmpdir } from 'node:os';
import { dirname, join, relative } from 'node:path';
import { fileURLToPath } from 'node:url';
import { parseArgs } from 'node:util';
import { cleanUpChildren } from './children.ts';
import { markdown, text, type Row } from './lib.ts';
import { loadPeers } from './peers.ts';
import { memorySection } from './sections/memory.ts';
import { queueSection } from './sections/queue.ts';
import { resumeSection } from './sections/resume.ts';
import { routerSection } from './sections/router.ts';
import { stepSections } from './sections/steps.ts';

const SECTIONS = ['steps', 'resume', 'router', 'queue', 'memory'] as const;
type Section = (typeof SECTIONS)[number];

const USAGE = `Usage: npm run bench [-- options]
  --quick          fewer steps, runs and repetitions (a smoke run; its figures are noisier)
  --only LIST      sections to run, comma-separated: ${SECTIONS.join(', ')}
  --reps N         repetitions per comparison (default 5; 3 with --quick)
  --no-peers       leave out LangGraph.js and Mastra (no install)
  --help           this text`;

function options() {
  try {
    const { values } = parseArgs({
      options: {
        quick: { type: 'boolean', default: false },
        only: { type: 'string' },
        reps: { type: 'string' },
        'no-peers': { type: 'boolean', default: false },
        help: { type: 'boolean', default: false },
      },
    });
    if (values.help) {
      console.log(USAGE);
      process.exit(0);
    }
    const only = (values.only ?? SECTIONS.join(',')).split(',').map((s) => s.trim());
    if (only.includes('')) throw new Error(`--only has an empty section name: "${values.only}"`);
    const unknown = only.filter((s) => !(SECTIONS as readonly string[]).includes(s));
    if (unknown.length) throw new Error(`unknown section ${unknown.join(', ')}`);
    const repsText = values.reps ?? (values.quick ? '3' : '5');
    if (!/^[1-9]\d*$/.test(repsText)) {
      throw new Error(`--reps must be a positive whole number, got "${repsText}"`);
    }
    const reps = Number(repsText);
    return {
      quick: values.quick,
      only: new Set(only as Section[]),
      reps,
      peers: !values['no-peers'],
    };
  } catch (error) {
    console.error(`${(error as Error).message}\n\n${USAGE}`);
    process.exit(2);
  }
}

const opts = options();
const log = (line: string) => console.error(line);
const scale = opts.quick
  ? {
      steps: 200,
      peerLargeSteps: 50,
      resume: [10, 1_000, 5_000],
      calls: 100,
      runs: 1_000,
      memoryRuns: 2_000,
    }
  : {
      steps: 1_000,
      peerLargeSteps: 200,
      resume: [10, 1_000, 10_000],
      calls: 400,
      runs: 5_000,
      memoryRuns: 10_000,
    };

const root = dirname(fileURLToPath(import.meta.url));
const work = mkdtempSync(join(tmpdir(), 'keel-bench-'));
/** Interrupted: stop the children, remove the databases and the bundle, then go. */
for (const [signal, code] of [
  ['SIGINT', 130],
  ['SIGTERM', 143],
] as const) {
  process.once(signal, () => {
    cleanUpChildren();
    rmSync(work, { recursive: true, force: true });
    console.error(`\nInterrupted: nothing written to bench/results.`);
    process.exit(code);
  });
}
const rows: Row[] = [];
const notes: string[] = [];
const started = Date.now();
try {
  if (opts.only.has('steps')) {
    const { peers, missing } = opts.peers
      ? await loadPeers(log)
      : { peers: [], missing: ['LangGraph.js and Mastra (--no-peers)'] };
    for (const m of missing) notes.push(`Peer left out: ${m}.`);
    for (const p of peers) notes.push(`${p.name}: ${p.describe}.`);
    notes.push(
      'Written per step: what the process passed to write(2) (wchar of /proc/self/io). ' +
        'SQLite writes whole 4 KB pages to the WAL and copies them into the database file at ' +
        "each WAL checkpoint, so even the floor's one small row costs several KB; " +
        "'stored in rows' is what keel's milestones hold.",
    );
    log(`steps: ${scale.steps} steps, ${opts.reps} repetitions, ${peers.length} peer(s)...`);
    rows.push(
      ...(await stepSections({
        dir: work,
        reps: opts.reps,
        steps: scale.steps,
        peerLargeSteps: scale.peerLargeSteps,
        peers,
      })),
    );
  }
  if (opts.only.has('resume')) {
    log(`resume: runs killed after ${scale.resume.join(', ')} steps...`);
    rows.push(...(await resumeSection(work, opts.reps, scale.resume)));
  }
  if (opts.only.has('router')) {
    log(`router: ${scale.calls} calls per repetition...`);
    rows.push(...(await routerSection(work, opts.reps, scale.calls)));
  }
  if (opts.only.has('queue')) {
    log(`queue: ${scale.runs} runs per repetition...`);
    rows.push(...(await queueSection(work, opts.reps, scale.runs, 8)));
  }
  if (opts.only.has('memory')) {
    log(`memory: ${scale.memoryRuns} queued runs, a 10 MB state...`);
    rows.push(...(await memorySection(work, Math.min(opts.reps, 3), scale.memoryRuns, 10)));
  }
} finally {
  cleanUpChildren();
  rmSync(work, { recursive: true, force: true });
}

const cpu = `${cpus().length} × ${cpus()[0]?.model.trim() ?? 'CPU'}`;
const machine = `Node ${process.version}, ${process.platform}/${process.arch}, ${cpu}`;
const startedAt = new Date(started).toISOString();
const repetitions = `${opts.reps} repetition${opts.reps === 1 ? '' : 's'}`;
const header =
  `keel benchmark, ${startedAt}${opts.quick ? ' (--quick)' : ''}; ${machine}; ${repetitions}, ` +
  'alternating; median, min-max, ratio of medians';
for (const note of new Set(rows.map((r) => r.note))) if (note) notes.push(note);
const missed = rows.filter((r) => r.met === false);
console.log(`\n${header}\n\n${text(rows)}\n`);
for (const note of notes) console.log(note);
console.log(
  missed.length
    ? `Goals missed: ${missed.map((r) => `${r.section}, ${r.subject}`).join('; ')}.`
    : `Every goal in ${opts.only.size === SECTIONS.length ? 'the table' : 'these sections'} met.`,
);

const out = join(root, 'results');
mkdirSync(out, { recursive: true });
const stamp = new Date(started).toISOString().replace(/[:.]/g, '-');
const body = `${header}\n\n${markdown(rows)}\n\n${notes.map((n) => `- ${n}`).join('\n')}\n`;
writeFileSync(join(out, `bench-${stamp}.md`), body);
const results = { startedAt, quick: opts.quick, reps: opts.reps, machine, notes, rows };
writeFileSync(join(out, `bench-${stamp}.json`), `${JSON.stringify(results, null, 2)}\n`);
writeFileSync(join(out, 'latest.md'), body);
console.log(`Written: ${relative(process.cwd(), join(out, `bench-${stamp}.{json,md}`))}`);
