/**
 * The engines keel is compared with live in `bench/peers/`, a package of their own: `npm ci` and
 * the tests never carry them. The first `npm run bench` installs them from the lock file there;
 * without a registry the benchmark still runs keel's sections and the table says the peers are
 * missing.
 */
import { spawnSync } from 'node:child_process';
import { existsSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { localHost } from '../adapters/host.ts';

export const PEERS_DIR = join(dirname(fileURLToPath(import.meta.url)), 'peers');

/** One linear run of a peer: `steps` nodes, each changing one small field of the state. */
export interface LinearOptions {
  /** Database file to create (it does not exist yet); its folder exists. */
  file: string;
  steps: number;
  /** Bytes of a filler string `blob` the state carries and no step touches. */
  stateBytes: number;
  /** Applied where the peer lets us; its `describe` says what was set. */
  synchronous: 'NORMAL' | 'FULL';
}

export interface PreparedRun {
  /** Runs the workflow once, checkpointed by the peer's own store; how many steps ran. */
  run(): Promise<{ stepsRun: number }>;
  close(): Promise<void>;
}

export interface Peer {
  name: string;
  /** How it was set up (store, journal mode, durability), for the table. */
  describe: string;
  prepareLinear(options: LinearOptions): Promise<PreparedRun>;
}

interface PeerModule {
  prepareLinear(options: LinearOptions): Promise<PreparedRun>;
  describe(options: LinearOptions): string;
}

const MODULES = [
  { name: 'LangGraph.js', file: 'langgraph.ts', version: '@langchain/langgraph' },
  { name: 'Mastra', file: 'mastra.ts', version: '@mastra/core' },
] as const;

/** Whether the installed packages are those the lock file names. */
function installed(): boolean {
  const lock = join(PEERS_DIR, 'package-lock.json');
  const done = join(PEERS_DIR, 'node_modules', '.package-lock.json');
  if (!existsSync(done)) return false;
  const wanted = JSON.parse(readFileSync(lock, 'utf8')) as { packages: Record<string, unknown> };
  const have = JSON.parse(readFileSync(done, 'utf8')) as { packages: Record<string, unknown> };
  return MODULES.every(
    (m) =>
      JSON.stringify(have.packages[`node_modules/${m.version}`]) ===
      JSON.stringify(wanted.packages[`node_modules/${m.version}`]),
  );
}

/** Installs the peers if they are not there yet; returns why not when that fails. */
export function ensurePeers(log: (line: string) => void): string | null {
  if (installed()) return null;
  const release = installLock(log);
  try {
    // Another benchmark may have installed them while this one waited for the lock.
    if (installed()) return null;
    log(
      'Installing the peers (LangGraph.js, Mastra) into bench/peers, once; ' +
        'this takes a minute or two...',
    );
    const npm = process.platform === 'win32' ? 'npm.cmd' : 'npm';
    const result = spawnSync(npm, ['ci', '--no-audit', '--no-fund', '--loglevel=error'], {
      cwd: PEERS_DIR,
      // npm's output goes to stderr with the progress lines: stdout carries only the table.
      stdio: ['ignore', 2, 2],
      // Mastra declares Node 22; it runs on 20, and the engine check must not stop the install.
      env: { ...process.env, npm_config_engine_strict: 'false' },
    });
    if (result.status === 0 && installed()) return null;
    return `npm ci in bench/peers failed (${result.error?.message ?? `exit ${result.status}`})`;
  } finally {
    release();
  }
}

/**
 * One install at a time: two benchmarks started together would both run npm ci in one folder
 * and break each other's build. The lock file holds its owner's pid; a lock whose owner is gone
 * is taken over.
 */
function installLock(log: (line: string) => void): () => void {
  const lock = join(PEERS_DIR, '.install.lock');
  const pause = new Int32Array(new SharedArrayBuffer(4));
  let told = false;
  for (;;) {
    try {
      writeFileSync(lock, String(process.pid), { flag: 'wx' });
      return () => rmSync(lock, { force: true });
    } catch (error) {
      if ((error as NodeJS.ErrnoException).code !== 'EEXIST') throw error;
    }
    const text = readFileSync(lock, 'utf8');
    const owner = Number(text);
    // An empty lock is one being written this instant: wait for its pid.
    if (text !== '' && !localHost.isAlive(owner)) {
      rmSync(lock, { force: true });
      continue;
    }
    if (!told)
      log(`Waiting for another benchmark (pid ${owner}) to finish installing the peers...`);
    told = true;
    Atomics.wait(pause, 0, 0, 500);
  }
}

export async function loadPeers(log: (line: string) => void): Promise<{
  peers: Peer[];
  missing: string[];
}> {
  const why = ensurePeers(log);
  if (why) return { peers: [], missing: MODULES.map((m) => `${m.name}: ${why}`) };
  const peers: Peer[] = [];
  const missing: string[] = [];
  for (const m of MODULES) {
    try {
      const mod = (await import(join(PEERS_DIR, m.file))) as PeerModule;
      peers.push({
        name: m.name,
        describe: mod.describe({ file: '', steps: 0, stateBytes: 0, synchronous: 'NORMAL' }),
        prepareLinear: (o) => mod.prepareLinear(o),
      });
    } catch (error) {
      missing.push(`${m.name}: ${String((error as Error)?.message ?? error).split('\n')[0]}`);
    }
  }
  return { peers, missing };
}
