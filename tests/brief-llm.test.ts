/**
 * The main job under provider outages: `keel run workflows/brief.ts` as a user runs it, with the
 * tiers taken from the environment and pointed at the fake servers. With the primary (Anthropic)
 * down the secondary (OpenAI) writes the summary; with every provider down the offline tier does,
 * and the brief says so.
 */
import { existsSync, mkdirSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { afterEach, beforeEach, expect, it } from 'vitest';
import { startFakeAnthropic, type FakeAnthropic } from './support/fake-anthropic.ts';
import { startFakeOpenAI, type FakeOpenAI } from './support/fake-openai.ts';
import { ROOT, keel, keelJson, tempDir } from './support/index.ts';

const ANTHROPIC_KEY = 'sk-ant-brief-SECRET-1111111111';
const OPENAI_KEY = 'sk-openai-brief-SECRET-2222222222';
let anthropic: FakeAnthropic;
let openai: FakeOpenAI;

beforeEach(async () => {
  [anthropic, openai] = await Promise.all([startFakeAnthropic(), startFakeOpenAI()]);
});
afterEach(async () => {
  await Promise.all([anthropic.close(), openai.close()]);
});

function setup() {
  const dir = tempDir('keel-brief-llm-');
  const docs = join(dir, 'docs');
  mkdirSync(docs);
  writeFileSync(
    join(docs, 'guide.md'),
    [
      '# Resume',
      '',
      'After a crash keel resumes the run from its last checkpoint.',
      'A resumed run never repeats an effect that completed.',
      '',
      '# Other',
      '',
      'Unrelated text about cooking pasta.',
      '',
    ].join('\n'),
  );
  const env = {
    ANTHROPIC_API_KEY: ANTHROPIC_KEY,
    ANTHROPIC_BASE_URL: anthropic.url,
    OPENAI_API_KEY: OPENAI_KEY,
    OPENAI_BASE_URL: openai.url,
    KEEL_LOCAL_BASE_URL: 'http://127.0.0.1:9/v1',
    // Every log line a run can print, so that the key checks see them all.
    KEEL_LOG: 'debug',
  };
  const input = JSON.stringify({ topic: 'resume after a crash', docs, outbox: join(dir, 'out') });
  const brief = join(dir, 'out', 'brief-resume-after-a-crash.md');
  return { dir, env, input, brief, db: join(dir, 'k.db') };
}

type Shown = {
  status: string;
  llmCalls: {
    step: string;
    tier: string;
    provider: string;
    degraded: boolean;
    attempts: { tier: string; class: string | null; status: number | null }[];
  }[];
};

async function runBrief(s: ReturnType<typeof setup>) {
  const run = await keel(
    ['run', join(ROOT, 'workflows/brief.ts'), '--db', s.db, '--input', s.input, '--no-progress'],
    { env: s.env, cwd: s.dir },
  );
  expect(run.code, run.stderr).toBe(0);
  const [summary] = await keelJson<{ id: string }[]>(['ls', '--db', s.db], { cwd: s.dir });
  const shown = await keelJson<Shown>(['show', summary!.id, '--db', s.db], { cwd: s.dir });
  expect(shown.status).toBe('completed');
  return { run, shown, text: readFileSync(s.brief, 'utf8') };
}

const down = { status: 503, error: { message: 'down', type: 'server_error' } };

it('primary down: the secondary writes the summary, and the brief names it', async () => {
  const s = setup();
  anthropic.script(Array.from({ length: 4 }, () => ({ status: 503 })));
  openai.script({ text: 'keel resumes a crashed run from its last checkpoint [1].' });
  const { shown, text } = await runBrief(s);
  expect(text).toContain(
    '## Summary\n\nkeel resumes a crashed run from its last checkpoint [1].\n\n' +
      '_Summary written by gpt-4.1-mini (openai, tier openai) from the findings below._',
  );
  expect(shown.llmCalls).toHaveLength(1);
  const [call] = shown.llmCalls;
  expect([call!.step, call!.tier, call!.provider, call!.degraded]).toEqual([
    'write',
    'openai',
    'openai',
    false,
  ]);
  expect(call!.attempts.map((a) => [a.tier, a.class, a.status])).toEqual([
    ['anthropic', 'server', 503],
    ['openai', null, null],
  ]);
  const prompt = (openai.requests[0]!.body as { messages: { role: string; content: string }[] })
    .messages;
  expect(prompt[0]!.role).toBe('system');
  expect(prompt[1]!.content).toContain(
    '[1] After a crash keel resumes the run from its last checkpoint. (guide.md:3)',
  );
});

it('every provider down: the offline tier writes the summary, marked degraded', async () => {
  const s = setup();
  anthropic.script(Array.from({ length: 4 }, () => ({ status: 500 })));
  openai.script(...Array.from({ length: 4 }, () => down));
  const { shown, text } = await runBrief(s);
  expect(text).toContain(
    '_Summary extracted offline (degraded): no language model tier answered, so sentences were picked from the findings instead of written._',
  );
  expect(text).toContain('After a crash keel resumes the run from its last checkpoint.');
  const [call] = shown.llmCalls;
  expect([call!.tier, call!.provider, call!.degraded]).toEqual(['degraded', 'degraded', true]);
  expect(call!.attempts.map((a) => [a.tier, a.class, a.status])).toEqual([
    ['anthropic', 'server', 500],
    ['openai', 'server', 503],
    ['degraded', null, null],
  ]);
  for (const key of [ANTHROPIC_KEY, OPENAI_KEY]) {
    expect(readFileSync(s.db).includes(Buffer.from(key))).toBe(false);
  }
});

it('a rejected key echoed back by the provider reaches no output, no log line and no byte of the database', async () => {
  const s = setup();
  anthropic.script([
    {
      status: 401,
      error: { type: 'authentication_error', message: `invalid x-api-key: ${ANTHROPIC_KEY}` },
    },
  ]);
  openai.script({ text: 'summary from the secondary [1].' });
  const { run, shown, text } = await runBrief(s);
  const [call] = shown.llmCalls;
  expect(call!.attempts.map((a) => [a.tier, a.class, a.status])).toEqual([
    ['anthropic', 'auth', 401],
    ['openai', null, null],
  ]);
  const shownText = await keel(
    ['show', '--db', s.db, (await keelJson<{ id: string }[]>(['ls', '--db', s.db]))[0]!.id],
    {
      cwd: s.dir,
      env: { KEEL_LOG: 'debug' },
    },
  );
  for (const output of [run.stdout, run.stderr, shownText.stdout, JSON.stringify(shown), text]) {
    expect(output).not.toContain(ANTHROPIC_KEY);
    expect(output).not.toContain(OPENAI_KEY);
  }
  for (const file of [s.db, `${s.db}-wal`]) {
    if (!existsSync(file)) continue;
    const bytes = readFileSync(file);
    expect(bytes.includes(Buffer.from(ANTHROPIC_KEY))).toBe(false);
    expect(bytes.includes(Buffer.from(ANTHROPIC_KEY.slice(7, 22)))).toBe(false);
  }
});

it('a bad LLM configuration stops keel run before any step runs: exit 2, no run recorded', async () => {
  const s = setup();
  const config = join(s.dir, 'bad.json');
  writeFileSync(
    config,
    JSON.stringify({ llm: { tiers: [{ provider: 'openai', apiKey: 'abc123' }] } }),
  );
  const run = await keel(
    ['run', join(ROOT, 'workflows/brief.ts'), '--db', s.db, '--input', s.input, '--no-progress'],
    { env: { ...s.env, KEEL_CONFIG: config }, cwd: s.dir },
  );
  expect(run.code).toBe(2);
  expect(run.stderr).toContain('llm.tiers[0].apiKey');
  expect(run.stderr).not.toContain('abc123');
  expect(existsSync(s.db)).toBe(false);
  const degraded = await keel(
    ['run', join(ROOT, 'workflows/brief.ts'), '--db', s.db, '--input', s.input, '--no-progress'],
    { env: { ...s.env, KEEL_DEGRADED: 'maybe' }, cwd: s.dir },
  );
  expect(degraded.code).toBe(2);
  expect(degraded.stderr).toContain('KEEL_DEGRADED must be on or off.');
});

it('a run says which tiers it uses, which refused their key, and when the offline tier answered', async () => {
  const s = setup();
  anthropic.script([{ status: 401, error: { type: 'authentication_error', message: 'bad key' } }]);
  openai.script(...Array.from({ length: 4 }, () => down));
  const { run } = await runBrief(s);
  expect(run.stderr).toContain('llm: anthropic: ANTHROPIC_API_KEY is set');
  expect(run.stderr).toMatch(/llm tier misconfigured; skipped .*tier=anthropic/);
  expect(run.stderr).toContain('llm call answered by the offline degraded tier');
});
