/**
 * Starting the bundled benchmark child (bench/child.ts) and reading what it says.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { rmSync } from 'node:fs';
import { join } from 'node:path';
import { createInterface } from 'node:readline';
import { ROOT } from '../tests/support/index.ts';
import { bundleChild } from '../tests/torture/bundle.ts';

export interface Child {
  process: ChildProcess;
  /** The next JSON line the child prints. */
  next(): Promise<Record<string, unknown>>;
  /** Resolves with the exit code, or the signal that ended it. */
  exited: Promise<number | string>;
}

let bundle: Promise<string> | undefined;
let bundlePath: string | undefined;
/** Children still running, to be stopped if the benchmark is interrupted. */
const live = new Set<ChildProcess>();

/** The child bundled once per benchmark process. */
export function childBin(): Promise<string> {
  bundle ??= bundleChild(join(ROOT, 'bench', 'child.ts'), 'keel-bench').then(
    (path) => (bundlePath = path),
  );
  return bundle;
}

/**
 * Stops the children still running and removes the bundle; synchronous, so that a signal handler
 * can call it on the way out.
 */
export function cleanUpChildren(): void {
  for (const child of live) child.kill('SIGKILL');
  live.clear();
  if (bundlePath) rmSync(bundlePath, { force: true });
}

export async function startChild(args: readonly string[]): Promise<Child> {
  const child = spawn(process.execPath, [await childBin(), ...args], {
    stdio: ['pipe', 'pipe', 'pipe'],
    env: { ...process.env, KEEL_BENCH_ROOT: ROOT },
  });
  live.add(child);
  let stderr = '';
  child.stderr.on('data', (chunk: Buffer) => (stderr += chunk.toString()));
  const lines = createInterface({ input: child.stdout });
  const queue: string[] = [];
  const waiting: ((line: string | null) => void)[] = [];
  lines.on('line', (line) => (waiting.length ? waiting.shift()!(line) : queue.push(line)));
  const exited = new Promise<number | string>((resolve) =>
    child.once('close', (code, signal) => {
      live.delete(child);
      resolve(code ?? signal ?? -1);
      for (const w of waiting.splice(0)) w(null);
    }),
  );
  return {
    process: child,
    exited,
    async next() {
      const line =
        queue.shift() ?? (await new Promise<string | null>((resolve) => waiting.push(resolve)));
      if (line === null) {
        throw new Error(`bench child ${args.join(' ')} ended without a result:\n${stderr}`);
      }
      return JSON.parse(line) as Record<string, unknown>;
    },
  };
}

/** Runs a child to its end and returns its one result line. */
export async function runChild(args: readonly string[]): Promise<Record<string, unknown>> {
  const child = await startChild(args);
  const result = await child.next();
  await child.exited;
  return result;
}
