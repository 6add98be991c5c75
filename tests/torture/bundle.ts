/**
 * Bundles a child process's entry (by default ./child.ts) and everything it imports (keel's engine
 * and adapters, the SDK it calls, the workflows) into one ES module under node_modules/.cache, where
 * the packages left out of the bundle (the native better-sqlite3, the Anthropic SDK that loads on
 * first use) still resolve. A bundled child starts in about a tenth of the time tsx takes.
 */
import { build } from 'esbuild';
import { join } from 'node:path';
import { ROOT } from '../support/index.ts';

export async function bundleChild(
  entry = join(ROOT, 'tests', 'torture', 'child.ts'),
  cache = 'keel-torture',
): Promise<string> {
  // One file per harness process, so that two tortures at once never read each other's half-written
  // bundle; the harness removes it when it is done.
  const outfile = join(ROOT, 'node_modules', '.cache', cache, `child-${process.pid}.mjs`);
  await build({
    entryPoints: [entry],
    outfile,
    bundle: true,
    platform: 'node',
    format: 'esm',
    target: 'node20',
    alias: { keel: join(ROOT, 'adapters', 'index.ts') },
    external: ['better-sqlite3', '@anthropic-ai/sdk'],
    // Packages written as CommonJS call require(); an ES module has none of its own.
    banner: {
      js: "import { createRequire } from 'node:module'; const require = createRequire(import.meta.url);",
    },
    logLevel: 'error',
  });
  return outfile;
}
