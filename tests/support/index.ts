/** Shared test helpers: temp folders, the real `keel` command in a child process, file polling. */
import { spawn, type ChildProcess } from 'node:child_process';
import { existsSync, mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { afterAll } from 'vitest';

export const ROOT = resolve(fileURLToPath(new URL('../..', import.meta.url)));
export const KEEL_BIN = join(ROOT, 'adapters/cli/keel.js');
export const FIXTURES = join(ROOT, 'tests/fixtures');

/** A fresh folder, removed after the test file's last test. */
export function tempDir(prefix = 'keel-test-'): string {
  const dir = mkdtempSync(join(tmpdir(), prefix));
  afterAll(() => rmSync(dir, { recursive: true, force: true }));
  return dir;
}

export type KeelResult = {
  code: number | null;
  signal: NodeJS.Signals | null;
  stdout: string;
  stderr: string;
};

export type KeelOptions = {
  env?: Record<string, string | undefined>;
  cwd?: string;
  timeoutMs?: number;
};

/** Starts `keel ARGS` as a child process (in its own process group), without waiting for it. */
export function spawnKeel(args: string[], options: KeelOptions = {}): ChildProcess {
  return spawn(process.execPath, [KEEL_BIN, ...args], {
    cwd: options.cwd ?? ROOT,
    env: { ...process.env, KEEL_CRASH_AT: undefined, ...options.env },
    stdio: ['ignore', 'pipe', 'pipe'],
    detached: true,
  });
}

/** Runs `keel ARGS` to the end and returns its exit code and output. */
export function keel(args: string[], options: KeelOptions = {}): Promise<KeelResult> {
  const child = spawnKeel(args, options);
  return collect(child, options.timeoutMs ?? 30_000);
}

/** Waits for a child to exit, collecting its output; kills it (SIGKILL) past the timeout. */
export function collect(child: ChildProcess, timeoutMs = 30_000): Promise<KeelResult> {
  let stdout = '';
  let stderr = '';
  child.stdout?.on('data', (d: Buffer) => (stdout += d.toString()));
  child.stderr?.on('data', (d: Buffer) => (stderr += d.toString()));
  return new Promise((resolvePromise, reject) => {
    const timer = setTimeout(() => {
      child.kill('SIGKILL');
      reject(
        new Error(`keel timed out after ${timeoutMs} ms\nstdout: ${stdout}\nstderr: ${stderr}`),
      );
    }, timeoutMs);
    child.on('close', (code, signal) => {
      clearTimeout(timer);
      resolvePromise({ code, signal, stdout, stderr });
    });
  });
}

/** `keel ... --json` parsed. */
export async function keelJson<T = unknown>(args: string[], options: KeelOptions = {}): Promise<T> {
  const result = await keel([...args, '--json'], options);
  try {
    return JSON.parse(result.stdout) as T;
  } catch {
    throw new Error(
      `keel ${args.join(' ')} printed no JSON (exit ${result.code}):\n${result.stdout}\n${result.stderr}`,
    );
  }
}

/** Polls until `check` returns true, at most `timeoutMs`. */
export async function waitFor(
  check: () => boolean,
  timeoutMs = 20_000,
  what = 'condition',
): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!check()) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 10));
  }
}

/** Lines of a file, [] when it does not exist. */
export function lines(file: string): string[] {
  if (!existsSync(file)) return [];
  return readFileSync(file, 'utf8').split('\n').filter(Boolean);
}

/** Kills a child started by {@link spawnKeel} with SIGKILL and waits for it to be gone. */
export async function killHard(child: ChildProcess): Promise<void> {
  if (child.exitCode !== null || child.signalCode !== null) return;
  const gone = new Promise((r) => child.once('close', r));
  child.kill('SIGKILL');
  await gone;
}
