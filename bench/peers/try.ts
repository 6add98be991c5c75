/**
 * Tries the peer adapters outside the benchmark harness and prints what each run cost.
 *
 *   npx tsx bench/peers/try.ts [peer ...] [--steps=200,1000] [--bytes=0,100000]
 *                              [--big-steps=200] [--sync=NORMAL]
 *
 * --big-steps are the step counts used when the state carries a blob (stateBytes > 0).
 *
 * Per run: ms per step (run() alone), bytes the process wrote per step (`wchar` from
 * /proc/self/io, so it counts WAL, journal and main-file writes alike) and the database size
 * afterwards: the -wal file as the run left it, and the main file once the peer has closed.
 */
import { mkdtempSync, readFileSync, rmSync, statSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { performance } from 'node:perf_hooks';
import { setTimeout as delay } from 'node:timers/promises';
import { setFlagsFromString } from 'node:v8';
import { runInNewContext } from 'node:vm';

interface LinearOptions {
  file: string;
  steps: number;
  stateBytes: number;
  synchronous: 'NORMAL' | 'FULL';
}
interface PeerModule {
  prepareLinear(options: LinearOptions): Promise<{
    run(): Promise<{ stepsRun: number }>;
    close(): Promise<void>;
  }>;
  describe(options: LinearOptions): string;
}

const PEERS: Record<string, string> = {
  langgraph: './langgraph.ts',
  mastra: './mastra.ts',
};

interface Args {
  peers: string[];
  steps: number[];
  bytes: number[];
  bigSteps: number[];
  synchronous: LinearOptions['synchronous'];
}

function parseArgs(argv: string[]): Args {
  const flags = new Map<string, string>();
  const peers: string[] = [];
  for (const arg of argv) {
    const match = /^--([\w-]+)=(.*)$/.exec(arg);
    if (match?.[1] !== undefined && match[2] !== undefined) flags.set(match[1], match[2]);
    else peers.push(arg);
  }
  const list = (name: string, fallback: string) =>
    (flags.get(name) ?? fallback).split(',').map((s) => Number(s));
  const sync = flags.get('sync') ?? 'NORMAL';
  if (sync !== 'NORMAL' && sync !== 'FULL') throw new Error(`--sync must be NORMAL or FULL`);
  for (const peer of peers) if (!(peer in PEERS)) throw new Error(`unknown peer ${peer}`);
  return {
    peers: peers.length > 0 ? peers : Object.keys(PEERS),
    steps: list('steps', '200,1000'),
    bytes: list('bytes', '0,100000'),
    bigSteps: list('big-steps', '200'),
    synchronous: sync,
  };
}

/**
 * libsql's Database.close() leaves the SQLite connection open until the JS objects are garbage
 * collected, so the WAL is only folded into the main file then. Collect before reading sizes.
 */
async function collectGarbage(): Promise<void> {
  setFlagsFromString('--expose-gc');
  const gc = runInNewContext('gc') as () => void;
  gc();
  // Native handles are released by finalizers, which run after the collection, not during it.
  await delay(50);
  gc();
}

/** Bytes this process has handed to write(2) and friends so far. */
function writtenBytes(): number {
  const match = /^wchar:\s*(\d+)$/m.exec(readFileSync('/proc/self/io', 'utf8'));
  if (!match?.[1]) throw new Error('no wchar in /proc/self/io');
  return Number(match[1]);
}

function sizeOf(path: string): number {
  try {
    return statSync(path).size;
  } catch {
    return 0;
  }
}

interface Row {
  peer: string;
  steps: number;
  stateBytes: number;
  msPerStep: number;
  writtenPerStep: number;
  dbBytes: number;
  walBytes: number;
  describe: string;
}

async function measure(peer: string, module: PeerModule, options: LinearOptions): Promise<Row> {
  const prepared = await module.prepareLinear(options);
  let run: { stepsRun: number; elapsed: number; written: number; walBytes: number };
  try {
    const before = writtenBytes();
    const start = performance.now();
    const { stepsRun } = await prepared.run();
    const elapsed = performance.now() - start;
    const written = writtenBytes() - before;
    // The WAL is folded back into the main file on close, so read its size first.
    run = { stepsRun, elapsed, written, walBytes: sizeOf(`${options.file}-wal`) };
  } finally {
    await prepared.close();
  }
  await collectGarbage();
  if (run.stepsRun !== options.steps) throw new Error(`${peer}: ran ${run.stepsRun} steps`);
  return {
    peer,
    steps: options.steps,
    stateBytes: options.stateBytes,
    msPerStep: run.elapsed / run.stepsRun,
    writtenPerStep: run.written / run.stepsRun,
    dbBytes: sizeOf(options.file),
    walBytes: run.walBytes,
    describe: module.describe(options),
  };
}

function format(rows: Row[]): string {
  const header = [
    'peer',
    'steps',
    'stateBytes',
    'ms/step',
    'written/step',
    'db (closed)',
    'wal (open)',
  ];
  const lines = rows.map((r) => [
    r.peer,
    String(r.steps),
    String(r.stateBytes),
    r.msPerStep.toFixed(3),
    `${(r.writtenPerStep / 1024).toFixed(1)} KiB`,
    `${(r.dbBytes / 1024 / 1024).toFixed(2)} MiB`,
    `${(r.walBytes / 1024 / 1024).toFixed(2)} MiB`,
  ]);
  const widths = header.map((h, c) => Math.max(h.length, ...lines.map((l) => l[c]?.length ?? 0)));
  const show = (cells: string[]) =>
    cells.map((cell, c) => cell.padStart(widths[c] ?? 0)).join('  ');
  return [show(header), ...lines.map(show)].join('\n');
}

async function main(): Promise<void> {
  const args = parseArgs(process.argv.slice(2));
  const dir = mkdtempSync(join(tmpdir(), 'keel-peers-'));
  const rows: Row[] = [];
  try {
    for (const peer of args.peers) {
      const module = (await import(PEERS[peer] as string)) as PeerModule;
      // One short untimed run first, so the first measured row is not also paying for JIT warm-up.
      const warmUp = { file: join(dir, `${peer}-warm-up.db`), steps: 20, stateBytes: 0 };
      await measure(peer, module, { ...warmUp, synchronous: args.synchronous });
      for (const stateBytes of args.bytes) {
        const stepCounts = stateBytes > 0 ? args.bigSteps : args.steps;
        for (const steps of stepCounts) {
          const file = join(dir, `${peer}-${steps}-${stateBytes}.db`);
          const row = await measure(peer, module, {
            file,
            steps,
            stateBytes,
            synchronous: args.synchronous,
          });
          rows.push(row);
          console.log(`${row.describe}: ${steps} steps, ${stateBytes} B state done`);
        }
      }
    }
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
  console.log(`\n${format(rows)}`);
}

await main();
