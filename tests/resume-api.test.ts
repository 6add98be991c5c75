/**
 * Resuming runs that were started from code: the file that defined the workflow is imported again
 * only when it is not the program's entry script, and a run started in this process is resumed
 * with the definition that started it.
 */
import { spawnSync } from 'node:child_process';
import { copyFileSync, renameSync } from 'node:fs';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { FIXTURES, ROOT, keel, keelJson, lines, tempDir } from './support/index.ts';

const SCRIPT = join(FIXTURES, 'api-inline-script.ts');

function runScript(dir: string, env: Record<string, string> = {}) {
  return spawnSync(process.execPath, ['--import', 'tsx', SCRIPT], {
    cwd: ROOT,
    env: { ...process.env, KEEL_CRASH_AT: undefined, API_DIR: dir, ...env },
    encoding: 'utf8',
  });
}

describe('runs started from a script', () => {
  it('resume --all does not run the entry script again: it reports that the run needs its definition', async () => {
    const dir = tempDir('keel-api-');
    const crashed = runScript(dir, { KEEL_CRASH_AT: 'step:after-commit@1' });
    expect(crashed.signal).toBe('SIGKILL');
    const db = join(dir, 'keel.db');
    const resumed = await keel(['resume', '--all', '--db', db, '--no-progress']);
    expect(resumed.code).toBe(1);
    expect(resumed.stdout).toMatch(
      /: not resumed — Run \S+ recorded no workflow file to load "api-inline" from\./,
    );
    expect(lines(join(dir, 'top-level.log'))).toHaveLength(1);
    const runs = await keelJson<{ status: string; cursor: string }[]>(['ls', '--db', db]);
    expect(runs.map((r) => [r.status, r.cursor])).toEqual([['running', 'b']]);
  });

  it('a second engine in the same process resumes with the definition that started the run', () => {
    const dir = tempDir('keel-api-');
    const done = runScript(dir);
    expect(done.status).toBe(0);
    const [line] = done.stdout.trim().split('\n').slice(-1);
    expect(JSON.parse(line!)).toEqual({
      status: 'completed',
      again: expect.stringMatching(
        /^Run \S+ is completed; there is nothing to resume\.$/,
      ) as unknown,
    });
    expect(lines(join(dir, 'top-level.log'))).toHaveLength(1);
  });
});

describe('a workflow file that moved', () => {
  it('resume --file NEW_PATH carries the run on and records where the file is now', async () => {
    const dir = tempDir('keel-moved-');
    const db = join(dir, 'keel.db');
    const first = join(dir, 'charge.mts');
    const moved = join(dir, 'renamed.mts');
    copyFileSync(join(FIXTURES, 'fx-save.ts'), first);
    const env = { FX_SAVE_DIR: dir };
    const input = JSON.stringify({ order: 'm-1' });
    const crashed = await keel(['run', first, '--db', db, '--input', input], {
      env: { ...env, KEEL_CRASH_AT: 'step:after-commit@1' },
    });
    expect(crashed.signal).toBe('SIGKILL');
    renameSync(first, moved);
    const [run] = await keelJson<{ id: string }[]>(['ls', '--db', db]);
    const id = run!.id;

    const lost = await keel(['resume', id, '--db', db, '--no-progress'], { env });
    expect(lost.code).toBe(2);
    expect(lost.stderr).toContain(`Run ${id} was started from ${first}, which no longer exists.`);
    expect(lost.stderr).toContain(`keel resume ${id} --file NEW_PATH`);

    const resumed = await keel(['resume', id, '--file', moved, '--db', db, '--no-progress'], {
      env,
    });
    expect(resumed.code, resumed.stderr).toBe(0);
    const view = await keelJson<{ status: string; module: string; state: { note: string } }>([
      'show',
      id,
      '--db',
      db,
    ]);
    expect(view.status).toBe('completed');
    expect(view.module).toBe(moved);
    expect(view.state.note).toMatch(/^paid with r-\d+-\d+$/);
    expect(lines(join(dir, 'calls.log'))).toEqual(['charge:m-1']);
  });
});
