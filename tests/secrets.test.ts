/**
 * Secrets and trust: `secret(...)` values are encrypted in every row that holds them and shown as
 * `[secret]` by every view; keys come from the environment only and are never stored; the database
 * is its owner's alone; provider API keys reach no byte of the database and no output. Real `keel`
 * processes on real SQLite files; the checks scan the files and every output byte-wise.
 */
import Database from 'better-sqlite3';
import { createDecipheriv, createHash, randomBytes, randomUUID } from 'node:crypto';
import { spawn } from 'node:child_process';
import {
  chmodSync,
  existsSync,
  mkdirSync,
  readFileSync,
  readdirSync,
  statSync,
  writeFileSync,
} from 'node:fs';
import { basename, dirname, join } from 'node:path';
import { inspect } from 'node:util';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import {
  openEngine,
  parseSecretKey,
  secret,
  Secret,
  TerminalError,
  workflow,
  type Engine,
} from 'keel';
import { startFakeAnthropic, type FakeAnthropic } from './support/fake-anthropic.ts';
import { startFakeOpenAI, type FakeOpenAI } from './support/fake-openai.ts';
import {
  FIXTURES,
  KEEL_BIN,
  ROOT,
  collect,
  keel,
  keelJson,
  tempDir,
  type KeelOptions,
  type KeelResult,
} from './support/index.ts';

const TOKEN_FLOW = join(FIXTURES, 'secret-token.ts');
const LLM_FLOW = join(FIXTURES, 'secret-llm.ts');
/** After the milestone of `login`, the second step: the token and the session are both stored. */
const AFTER_LOGIN = 'step:after-commit@2';
/** What a view shows: nothing inherited from this process's environment, every log line on. */
const NO_KEY = { KEEL_SECRET_KEY: undefined, KEEL_SECRET_KEYS_OLD: undefined, KEEL_LOG: 'debug' };

const newKey = () => randomBytes(32).toString('base64');
const keyIdOf = (key: Buffer) => createHash('sha256').update(key).digest('hex').slice(0, 8);

function expectCode(result: KeelResult, code: number): void {
  expect(result, `stdout:\n${result.stdout}\nstderr:\n${result.stderr}`).toMatchObject({ code });
}

/** The database and every file SQLite keeps beside it (-wal, -shm), as bytes. */
function databaseFiles(db: string): { name: string; bytes: Buffer }[] {
  return readdirSync(dirname(db))
    .filter((f) => f.startsWith(basename(db)))
    .map((f) => ({ name: f, bytes: readFileSync(join(dirname(db), f)) }));
}

/** Every place among `haystacks` where one of `needles` occurs, as "place: needle". */
function leaks(haystacks: { name: string; bytes: Buffer | string }[], needles: string[]): string[] {
  const found: string[] = [];
  for (const { name, bytes } of haystacks) {
    const buffer = typeof bytes === 'string' ? Buffer.from(bytes) : bytes;
    for (const needle of needles)
      if (buffer.includes(Buffer.from(needle))) found.push(`${name}: ${needle}`);
  }
  return found;
}

const outputs = (label: string, result: KeelResult) => [
  { name: `${label} stdout`, bytes: result.stdout },
  { name: `${label} stderr`, bytes: result.stderr },
];

type Sealed = { k: string; iv: string; t: string; c: string };

/** The encrypted secrets stored in a run's checkpoints and effect results, in order of writing. */
function storedSecrets(db: string): Sealed[] {
  const sqlite = new Database(db, { readonly: true });
  try {
    const rows = [
      ...sqlite.prepare('SELECT data FROM checkpoints ORDER BY run_id, seq').pluck().all(),
      ...sqlite
        .prepare(
          'SELECT result FROM effects WHERE result IS NOT NULL ORDER BY run_id, completed_at',
        )
        .pluck()
        .all(),
    ] as string[];
    const found: Sealed[] = [];
    const walk = (node: unknown): void => {
      if (node === null || typeof node !== 'object') return;
      const record = node as Record<string, unknown>;
      if (record.$ === 'E') found.push(record.v as Sealed);
      else for (const value of Object.values(record)) walk(value);
    };
    for (const row of rows) walk(JSON.parse(row));
    return found;
  } finally {
    sqlite.close();
  }
}

/** Decrypts a stored secret with AES-256-GCM, independently of keel's code. */
function decrypt(sealed: Sealed, key: Buffer): string {
  const decipher = createDecipheriv('aes-256-gcm', key, Buffer.from(sealed.iv, 'base64'));
  decipher.setAuthTag(Buffer.from(sealed.t, 'base64'));
  return Buffer.concat([
    decipher.update(Buffer.from(sealed.c, 'base64')),
    decipher.final(),
  ]).toString('utf8');
}

type Shown = {
  status: string;
  cursor: string | null;
  live: boolean;
  stepCount: number;
  state: Record<string, unknown>;
  input: Record<string, unknown>;
  effects: { name: string; status: string; attempts: number; result: unknown }[];
  steps: { name: string; status: string }[];
  error: { code?: string; path?: string; message: string } | null;
};

/** A token run's fixed parts: a unique plaintext, where `use` writes what it saw, the database. */
function tokenRun(prefix: string) {
  const dir = tempDir(`keel-secrets-${prefix}-`);
  const token = `tok-${randomUUID()}`;
  const out = join(dir, 'seen.json');
  const env = { ...NO_KEY, SECRET_TOKEN: token, SECRET_OUT: out };
  const db = join(dir, 'data', 'k.db');
  const run = (extra: KeelOptions['env'] = {}) =>
    keel(['run', TOKEN_FLOW, '--db', db, '--input', '{"label":"one"}', '--no-progress'], {
      env: { ...env, ...extra },
      cwd: dir,
    });
  const resume = (id: string, extra: KeelOptions['env'] = {}) =>
    keel(['resume', id, '--db', db, '--no-progress'], { env: { ...env, ...extra }, cwd: dir });
  const runId = async () => (await keelJson<{ id: string }[]>(['ls', '--db', db]))[0]!.id;
  const show = (id: string) => keelJson<Shown>(['show', id, '--db', db], { env: NO_KEY, cwd: dir });
  const seen = () => JSON.parse(readFileSync(out, 'utf8')) as { token: string; session: string };
  return { dir, db, token, out, run, resume, runId, show, seen };
}

describe('secret values', () => {
  it('print as [secret] through String, templates, JSON, util.inspect and nested objects; reveal() gives the value', () => {
    const s = secret({ user: 'ann', password: 'pw-123' });
    expect(s.reveal()).toEqual({ user: 'ann', password: 'pw-123' });
    // eslint-disable-next-line @typescript-eslint/restrict-template-expressions -- what is tested
    expect([String(s), `${s}`, JSON.stringify(s), inspect(s)]).toEqual([
      '[secret]',
      '[secret]',
      '"[secret]"',
      '[secret]',
    ]);
    expect(JSON.stringify({ login: s })).toBe('{"login":"[secret]"}');
    expect(inspect({ login: s, list: [s] })).toBe('{ login: [secret], list: [ [secret] ] }');
    expect(Object.keys(s)).toEqual([]);
  });

  it('keel keygen prints a new 32-byte key each time, which KEEL_SECRET_KEY takes, as base64 or hex', async () => {
    const [a, b, json] = await Promise.all([
      keel(['keygen']),
      keel(['keygen']),
      keelJson<{ key: string }>(['keygen']),
    ]);
    expectCode(a, 0);
    const keys = [a.stdout.trim(), b.stdout.trim(), json.key];
    expect(new Set(keys).size).toBe(3);
    for (const key of keys) {
      expect(key).toMatch(/^[A-Za-z0-9+/]{43}=$/);
      const bytes = Buffer.from(key, 'base64');
      expect(bytes.length).toBe(32);
      expect(parseSecretKey(key, 'k')).toEqual({ id: keyIdOf(bytes), key: bytes });
      expect(parseSecretKey(bytes.toString('hex'), 'k')).toEqual({
        id: keyIdOf(bytes),
        key: bytes,
      });
    }
  });
});

describe('A: a secret in the state and in an effect result', () => {
  it('is stored encrypted, shown as [secret] without a key, and revealed by the step after a SIGKILL in a fresh process', async () => {
    const t = tokenRun('main');
    const key = (await keel(['keygen'])).stdout.trim();
    const keyBytes = Buffer.from(key, 'base64');
    const withKey = { KEEL_SECRET_KEY: key };

    const crashed = await t.run({ ...withKey, KEEL_CRASH_AT: AFTER_LOGIN });
    expect(crashed.signal, crashed.stderr).toBe('SIGKILL');
    expect(existsSync(t.out)).toBe(false);
    // The kill leaves the WAL in place: the scans below read what was committed there too.
    expect(statSync(`${t.db}-wal`).size).toBeGreaterThan(0);
    // The step printed the token as a log field, in a template and with console.log.
    expect(crashed.stdout).toContain('loaded token [secret] [secret]\n');
    expect(crashed.stderr).toMatch(/DEBUG token loaded .*token="\[secret\]" label=one/);

    // Stored as AES-256-GCM under the key's id; decrypting it gives the encoded value back.
    const sealed = storedSecrets(t.db);
    expect(sealed.map((s) => s.k)).toEqual([
      keyIdOf(keyBytes),
      keyIdOf(keyBytes),
      keyIdOf(keyBytes),
    ]);
    expect(sealed.map((s) => decrypt(s, keyBytes)).sort()).toEqual(
      [`"${t.token}"`, `{"id":"session-${t.token}"}`, `{"id":"session-${t.token}"}`].sort(),
    );
    expect(new Set(sealed.map((s) => s.iv)).size).toBe(3);

    const id = await t.runId();
    const views = {
      show: await keel(['show', id, '--db', t.db], { env: NO_KEY }),
      showJson: await keel(['show', id, '--db', t.db, '--json'], { env: NO_KEY }),
      ls: await keel(['ls', '--db', t.db], { env: NO_KEY }),
      lsJson: await keel(['ls', '--db', t.db, '--json'], { env: NO_KEY }),
    };
    for (const view of Object.values(views)) expectCode(view, 0);
    const shown = JSON.parse(views.showJson.stdout) as Shown;
    expect(shown.state).toEqual({ label: 'one', token: '[secret]', session: '[secret]' });
    expect(shown.effects.map((e) => [e.name, e.status, e.result])).toEqual([
      ['login', 'done', { session: '[secret]', ok: true }],
    ]);
    expect(views.show.stdout).toContain(
      'state     {"label":"one","token":"[secret]","session":"[secret]"}',
    );
    expect(views.show.stdout).toContain(
      'login   login:one  done    1         login  {"session":"[secret]","ok":true}',
    );

    const resumed = await t.resume(id, withKey);
    expectCode(resumed, 0);
    expect(t.seen()).toEqual({ token: t.token, session: `session-${t.token}` });
    expect(resumed.stderr).toMatch(
      /INFO {2}used the token .*token="\[secret\]" session="\[secret\]"/,
    );
    const after = await t.show(id);
    expect(after.status).toBe('completed');
    expect(after.state).toEqual({
      label: 'one',
      token: '[secret]',
      session: '[secret]',
      receipt: '[secret]',
    });

    const everything = [
      ...databaseFiles(t.db),
      ...outputs('crashed run', crashed),
      ...outputs('resume', resumed),
      ...Object.entries(views).flatMap(([name, result]) => outputs(name, result)),
      { name: 'show --json after', bytes: JSON.stringify(after) },
    ];
    // Neither the plaintext nor the key, in any encoding keel could have used.
    expect(
      leaks(everything, [t.token, t.token.slice(4, 20), key, keyBytes.toString('hex')]),
    ).toEqual([]);
  });

  it('with no key set, storing a secret fails the run (SECRET_KEY_MISSING) and writes none of it; with the key, resume finishes the run', async () => {
    const t = tokenRun('nokey');
    const failed = await t.run();
    expectCode(failed, 1);
    expect(failed.stdout).toContain(
      'error: Cannot store state.token: it holds a secret, and no key is set to encrypt it; nothing was written.\n' +
        '  Set KEEL_SECRET_KEY to a key made with `keel keygen` (32 bytes, base64 or hex), or pass openEngine({ secretKey }).',
    );
    const id = await t.runId();
    const shown = await t.show(id);
    expect([shown.status, shown.error?.code, shown.error?.path]).toEqual([
      'failed',
      'SECRET_KEY_MISSING',
      'state.token',
    ]);
    expect(shown.steps.map((s) => [s.name, s.status])).toEqual([['load', 'failed']]);
    const letters = await keelJson<{ runId: string; reason: string; error: { code: string } }[]>(
      ['dlq', 'ls', '--db', t.db],
      { env: NO_KEY },
    );
    expect(letters.map((d) => [d.runId, d.reason, d.error.code])).toEqual([
      [id, 'not_retryable', 'SECRET_KEY_MISSING'],
    ]);
    expect(storedSecrets(t.db)).toEqual([]);
    expect(leaks([...databaseFiles(t.db), ...outputs('run', failed)], [t.token])).toEqual([]);

    const resumed = await t.resume(id, { KEEL_SECRET_KEY: newKey() });
    expectCode(resumed, 0);
    expect(t.seen()).toEqual({ token: t.token, session: `session-${t.token}` });
    expect((await t.show(id)).status).toBe('completed');
    expect(leaks([...databaseFiles(t.db), ...outputs('resume', resumed)], [t.token])).toEqual([]);
  });

  it('resuming without the key, or with another, names the key id it needs and leaves the run as it was; rotated, the old key reads and the new one writes', async () => {
    const t = tokenRun('rotate');
    const oldKey = newKey();
    const oldId = keyIdOf(Buffer.from(oldKey, 'base64'));
    const newBytes = randomBytes(32);
    const newId = keyIdOf(newBytes);
    const crashed = await t.run({ KEEL_SECRET_KEY: oldKey, KEEL_CRASH_AT: AFTER_LOGIN });
    expect(crashed.signal).toBe('SIGKILL');
    const id = await t.runId();
    const before = await t.show(id);
    expect([before.status, before.cursor, before.stepCount]).toEqual(['running', 'use', 2]);

    const withoutKey = await t.resume(id);
    expectCode(withoutKey, 1);
    expect(withoutKey.stderr).toContain(
      `keel: A stored secret was encrypted with key ${oldId}, which is not among the keys keel was given (none); nothing was changed.\n` +
        `  Set KEEL_SECRET_KEY to the key whose id is ${oldId}`,
    );
    // Given only the new key (as hex), the same: it names both ids.
    const wrongKey = await t.resume(id, { KEEL_SECRET_KEY: newBytes.toString('hex') });
    expectCode(wrongKey, 1);
    expect(wrongKey.stderr).toContain(
      `keel: A stored secret was encrypted with key ${oldId}, which is not among the keys keel was given (${newId}); nothing was changed.`,
    );
    expect(existsSync(t.out)).toBe(false);
    const unchanged = await t.show(id);
    expect([unchanged.status, unchanged.cursor, unchanged.stepCount, unchanged.live]).toEqual([
      'running',
      'use',
      2,
      false,
    ]);
    expect(unchanged.steps.map((s) => [s.name, s.status])).toEqual([
      ['load', 'completed'],
      ['login', 'completed'],
      ['use', 'interrupted'],
    ]);

    const rotated = await t.resume(id, {
      KEEL_SECRET_KEY: newBytes.toString('hex'),
      KEEL_SECRET_KEYS_OLD: `${newKey()}, ${oldKey}`,
    });
    expectCode(rotated, 0);
    expect(t.seen()).toEqual({ token: t.token, session: `session-${t.token}` });
    const sealed = storedSecrets(t.db);
    // The token and session as written before the rotation; the receipt `use` wrote after it.
    expect(sealed.map((s) => s.k)).toEqual([oldId, oldId, newId, oldId]);
    expect(decrypt(sealed[2]!, newBytes)).toBe(`"receipt-${t.token}"`);
    expect(
      leaks(
        [
          ...databaseFiles(t.db),
          ...outputs('no key', withoutKey),
          ...outputs('wrong key', wrongKey),
          ...outputs('rotated', rotated),
        ],
        [t.token, oldKey, newBytes.toString('hex')],
      ),
    ).toEqual([]);
  });

  it('a changed byte of a stored ciphertext fails the resume with SECRET_DAMAGED, never a wrong value', async () => {
    const t = tokenRun('tamper');
    const key = newKey();
    const crashed = await t.run({ KEEL_SECRET_KEY: key, KEEL_CRASH_AT: AFTER_LOGIN });
    expect(crashed.signal).toBe('SIGKILL');
    const id = await t.runId();
    const sqlite = new Database(t.db);
    const row = sqlite
      .prepare(`SELECT seq, data FROM checkpoints WHERE data LIKE '%"$":"E"%' ORDER BY seq LIMIT 1`)
      .get() as { seq: number; data: string };
    const stored = JSON.parse(row.data) as { value: { $: string; v: Sealed } }[];
    const sealed = stored[0]!.value.v;
    const flipped = sealed.c[2] === 'A' ? 'B' : 'A';
    sealed.c = `${sealed.c.slice(0, 2)}${flipped}${sealed.c.slice(3)}`;
    sqlite
      .prepare('UPDATE checkpoints SET data = ? WHERE run_id = ? AND seq = ?')
      .run(JSON.stringify(stored), id, row.seq);
    sqlite.close();

    const resumed = await t.resume(id, { KEEL_SECRET_KEY: key });
    expectCode(resumed, 1);
    expect(resumed.stderr).toContain(
      `keel: A stored secret (key ${keyIdOf(Buffer.from(key, 'base64'))}) failed its integrity check: its bytes in the database were changed or damaged, so it cannot be read.`,
    );
    expect(existsSync(t.out)).toBe(false);
    expect((await t.show(id)).status).toBe('running');
  });

  it('a malformed key is refused when the engine opens: exit 2, no database, and the message never repeats it', async () => {
    const t = tokenRun('malformed');
    const typo = `${newKey().slice(0, 40)}x!`;
    const bad = await t.run({ KEEL_SECRET_KEY: typo });
    expectCode(bad, 2);
    expect(bad.stderr).toBe(
      'keel: KEEL_SECRET_KEY is not a usable key: it must be 32 bytes, written as base64 (44 characters) or as 64 hex digits; it has a character that is neither base64 nor hex, at position 42.\n' +
        '  Make one with `keel keygen`, e.g. export KEEL_SECRET_KEY="$(keel keygen)".\n',
    );
    const short = randomBytes(31).toString('base64');
    const badOld = await t.run({
      KEEL_SECRET_KEY: newKey(),
      KEEL_SECRET_KEYS_OLD: `${newKey()},${short}`,
    });
    expectCode(badOld, 2);
    expect(badOld.stderr).toContain(
      'keel: key 2 of KEEL_SECRET_KEYS_OLD is not a usable key: it must be 32 bytes, written as base64 (44 characters) or as 64 hex digits; it has 44 characters.',
    );
    expect(existsSync(t.db)).toBe(false);
    expect(leaks([...outputs('bad', bad), ...outputs('bad old', badOld)], [typo, short])).toEqual(
      [],
    );
  });
});

describe('A: secrets through the API', () => {
  type Account = {
    apiKey: Secret<string>;
    pin?: Secret<string>;
    receipt?: Secret<{ id: string }>;
  };
  const API_KEY = `api-${randomUUID()}`;
  const PIN = `pin-${randomUUID()}`;
  const RECEIPT = `receipt-${randomUUID()}`;
  const seen: string[] = [];
  const account = workflow<Account>('secret-account', { version: 1 })
    .step('approve', async (state, ctx) => {
      const approval = await ctx.waitFor<{ pin: Secret<string> }>('approval');
      state.pin = approval.pin;
    })
    .effect('open', {
      key: () => 'open',
      run: () => ({ receipt: secret({ id: RECEIPT }) }),
      save: (state, result) => {
        state.receipt = result.receipt;
      },
    })
    .step('check', (state) => {
      seen.push(state.apiKey.reveal(), state.pin!.reveal(), state.receipt!.reveal().id);
    });
  const refusing = workflow<{ apiKey: Secret<string> }>('secret-refusing', { version: 1 }).step(
    'call',
    (state) => {
      throw new TerminalError(`the service refused ${String(state.apiKey)}`);
    },
  );

  let engine: Engine;
  let db: string;
  beforeEach(() => {
    db = join(tempDir('keel-secrets-api-'), 'k.db');
    engine = openEngine({ db, secretKey: newKey() });
  });
  afterEach(() => engine.close());

  it('in the input, a signal payload and an effect result: encrypted in every row, revealed in the steps, redacted in engine.get', async () => {
    const started = await engine.start(account, { apiKey: secret(API_KEY) });
    expect(started.status).toBe('waiting');
    expect(started.state.apiKey.reveal()).toBe(API_KEY);
    expect(await engine.signal(started.id, 'approval', { pin: secret(PIN) })).toEqual({
      woke: true,
    });
    const done = await engine.resume(started.id);
    expect(done.status).toBe('completed');
    expect(seen).toEqual([API_KEY, PIN, RECEIPT]);

    const view = await engine.get(started.id);
    expect(JSON.parse(JSON.stringify(view.input))).toEqual({ apiKey: '[secret]' });
    expect(JSON.parse(JSON.stringify(view.state))).toEqual({
      apiKey: '[secret]',
      pin: '[secret]',
      receipt: '[secret]',
    });
    expect(JSON.parse(JSON.stringify(view.effects[0]!.result))).toEqual({ receipt: '[secret]' });
    const redacted = (view.state as Account).pin!;
    expect(redacted).toBeInstanceOf(Secret);
    expect(() => redacted.reveal()).toThrow(
      expect.objectContaining({ code: 'SECRET_REDACTED' }) as Error,
    );
    expect(leaks(databaseFiles(db), [API_KEY, PIN, RECEIPT])).toEqual([]);
  });

  it('with no key, a secret input or signal payload is refused before anything is written', async () => {
    const keyless = openEngine({ db: `${db}.nokey` });
    try {
      await expect(keyless.start(account, { apiKey: secret(API_KEY) })).rejects.toThrow(
        'Cannot store state.apiKey: it holds a secret, and no key is set to encrypt it; nothing was written.',
      );
      expect(await keyless.list()).toEqual([]);
    } finally {
      await keyless.close();
    }
    expect(leaks(databaseFiles(`${db}.nokey`), [API_KEY])).toEqual([]);
  });

  it('an error message that names a secret says [secret], in the run and its dead letter', async () => {
    const result = await engine.start(refusing, { apiKey: secret(API_KEY) });
    expect(result.status).toBe('failed');
    expect(result.error?.message).toBe('the service refused [secret]');
    const [letter] = await engine.deadLetters();
    expect([letter!.runId, letter!.error.message]).toEqual([
      result.id,
      'the service refused [secret]',
    ]);
  });
});

describe('B: file permissions', () => {
  const modeOf = (path: string) => statSync(path).mode & 0o777;

  it('the folders keel creates are 0700, the database and its -wal and -shm files 0600, whatever the umask', async () => {
    const dir = tempDir('keel-secrets-modes-');
    for (const umask of ['022', '277', '000']) {
      const db = join(dir, umask, 'nested', 'k.db');
      const command = `umask ${umask} && exec "${process.execPath}" "${KEEL_BIN}" run "${TOKEN_FLOW}" --db "${db}" --input '{"label":"m"}' --no-progress`;
      const child = spawn('sh', ['-c', command], {
        cwd: ROOT,
        env: {
          ...process.env,
          ...NO_KEY,
          KEEL_SECRET_KEY: newKey(),
          SECRET_TOKEN: 't',
          SECRET_OUT: join(dir, `${umask}.json`),
          KEEL_CRASH_AT: AFTER_LOGIN,
        },
        stdio: ['ignore', 'pipe', 'pipe'],
      });
      const result = await collect(child);
      // Killed in the middle: the -wal and -shm files are still there to look at.
      expect(result.signal, result.stderr).toBe('SIGKILL');
      expect(
        [join(dir, umask), dirname(db), db, `${db}-wal`, `${db}-shm`].map(
          (p) => `${p.slice(dir.length)} ${modeOf(p).toString(8)}`,
        ),
      ).toEqual([
        `/${umask} 700`,
        `/${umask}/nested 700`,
        `/${umask}/nested/k.db 600`,
        `/${umask}/nested/k.db-wal 600`,
        `/${umask}/nested/k.db-shm 600`,
      ]);
    }
  });

  it('a folder and an empty database file that the user made keep their modes', async () => {
    const dir = tempDir('keel-secrets-own-');
    const folder = join(dir, 'shared');
    mkdirSync(folder);
    chmodSync(folder, 0o755);
    const db = join(folder, 'k.db');
    writeFileSync(db, '');
    chmodSync(db, 0o640);
    const run = await keel(['run', TOKEN_FLOW, '--db', db, '--input', '{"label":"u"}'], {
      env: { ...NO_KEY, KEEL_SECRET_KEY: newKey(), SECRET_TOKEN: 't', SECRET_OUT: join(dir, 'o') },
    });
    expectCode(run, 0);
    expect([modeOf(folder), modeOf(db)]).toEqual([0o755, 0o640]);
  });
});

describe('C: provider API keys', () => {
  let anthropic: FakeAnthropic;
  let openai: FakeOpenAI;
  beforeEach(async () => {
    [anthropic, openai] = await Promise.all([startFakeAnthropic(), startFakeOpenAI()]);
  });
  afterEach(async () => {
    await Promise.all([anthropic.close(), openai.close()]);
  });

  it('keys echoed back in provider errors reach no byte of the database and no output of run, show, dlq or doctor', async () => {
    const dir = tempDir('keel-secrets-apikeys-');
    // Lowercase letters and digits, not shaped like a provider key: only removing the key itself
    // keeps it out, and echoed as the error's code or type it passes for an error identifier.
    const anthropicKey = `antmarker${randomBytes(12).toString('hex')}`;
    const openaiKey = `oaimarker${randomBytes(12).toString('hex')}`;
    const env = {
      ...NO_KEY,
      ANTHROPIC_API_KEY: anthropicKey,
      ANTHROPIC_BASE_URL: anthropic.url,
      OPENAI_API_KEY: openaiKey,
      OPENAI_BASE_URL: openai.url,
      KEEL_LOCAL_BASE_URL: 'http://127.0.0.1:9/v1',
      KEEL_DEGRADED: 'off',
    };
    const echo = (key: string) => `invalid api key: ${key} (key ${key} was refused)`;
    const results: { name: string; bytes: string }[] = [];
    const keelRun = async (name: string, args: string[]) => {
      const result = await keel(args, { env, cwd: dir });
      results.push(...outputs(name, result));
      return result;
    };

    const refused = { status: 401, error: { type: anthropicKey, message: echo(anthropicKey) } };
    // One run completes: Anthropic refuses the key, OpenAI is rate limited once, then answers.
    const ok = join(dir, 'ok.db');
    anthropic.script([refused]);
    openai.script(
      {
        status: 429,
        error: { message: echo(openaiKey), type: 'rate_limit_error', code: openaiKey },
        headers: { 'retry-after-ms': '10' },
      },
      { text: 'An answer.' },
    );
    const completed = await keelRun('run ok', [
      'run',
      LLM_FLOW,
      '--db',
      ok,
      '--input',
      '{"topic":"a"}',
    ]);
    expectCode(completed, 0);

    // One run fails: Anthropic is down, OpenAI rejects the request, each saying the key.
    const bad = join(dir, 'bad.db');
    anthropic.script([{ status: 500, error: { type: anthropicKey, message: echo(anthropicKey) } }]);
    openai.script({
      status: 400,
      error: { message: echo(openaiKey), type: 'invalid_request_error', code: openaiKey },
    });
    const failed = await keelRun('run bad', [
      'run',
      LLM_FLOW,
      '--db',
      bad,
      '--input',
      '{"topic":"b"}',
    ]);
    expectCode(failed, 1);

    const okId = (await keelJson<{ id: string }[]>(['ls', '--db', ok]))[0]!.id;
    const badId = (await keelJson<{ id: string }[]>(['ls', '--db', bad]))[0]!.id;
    const shownOk = await keelRun('show ok', ['show', okId, '--db', ok, '--json']);
    const shownBad = await keelRun('show bad', ['show', badId, '--db', bad, '--json']);
    await keelRun('show bad (text)', ['show', badId, '--db', bad]);
    await keelRun('dlq ls', ['dlq', 'ls', '--db', bad, '--json']);
    await keelRun('dlq show', ['dlq', 'show', badId, '--db', bad]);
    anthropic.reset();
    anthropic.script([refused]);
    openai.script({
      status: 401,
      error: { message: echo(openaiKey), type: 'invalid_request_error', code: openaiKey },
    });
    const doctor = await keelRun('doctor', ['doctor', '--db', bad]);
    await keelRun('doctor --json', ['doctor', '--db', bad, '--json']);

    // The failures happened as scripted, so the echoes were there to leak.
    const ok1 = JSON.parse(shownOk.stdout) as {
      llmCalls: { attempts: { tier: string; class: string | null }[] }[];
    };
    expect(ok1.llmCalls[0]!.attempts.map((a) => [a.tier, a.class])).toEqual([
      ['anthropic', 'auth'],
      ['openai', 'rate_limited'],
      ['openai', null],
    ]);
    const bad1 = JSON.parse(shownBad.stdout) as Shown;
    expect([bad1.status, bad1.error?.code, bad1.error?.message.split('\n')[0]]).toEqual([
      'failed',
      'LLM_REJECTED',
      'request rejected by openai: 400 invalid_request_error',
    ]);
    expect(doctor.stdout).toContain('MISCONFIGURED: anthropic');
    expect(doctor.stdout).toContain('MISCONFIGURED: openai');
    expect(openai.requests.length).toBeGreaterThanOrEqual(5);

    expect(
      leaks(
        [...databaseFiles(ok), ...databaseFiles(bad), ...results],
        [anthropicKey, openaiKey, anthropicKey.slice(9, 25), openaiKey.slice(9, 25)],
      ),
    ).toEqual([]);
  });
});
