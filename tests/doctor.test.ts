import { writeFileSync } from 'node:fs';
import { createServer, type AddressInfo } from 'node:net';
import { join } from 'node:path';
import { afterAll, beforeAll, beforeEach, describe, expect, it } from 'vitest';
import type { DoctorReport } from '../adapters/cli/doctor.ts';
import { startFakeAnthropic, type FakeAnthropic } from './support/fake-anthropic.ts';
import { startFakeOpenAI, type FakeOpenAI } from './support/fake-openai.ts';
import { keel, tempDir } from './support/index.ts';
import { openSqliteStore } from '../adapters/sqlite/store.ts';

const ANTHROPIC_KEY = 'sk-ant-api03-doctor-5e6f7a8b9c0d';
const OPENAI_KEY = 'sk-proj-doctor-1f2e3d4c5b6a';

let anthropic: FakeAnthropic;
let openai: FakeOpenAI;
let closed: string;
const cwd = tempDir('keel-doctor-');

/** A loopback port with nothing listening on it. */
async function closedPort(): Promise<number> {
  const probe = createServer();
  await new Promise<void>((r) => probe.listen(0, '127.0.0.1', r));
  const { port } = probe.address() as AddressInfo;
  await new Promise<void>((r) => probe.close(() => r()));
  return port;
}

beforeAll(async () => {
  anthropic = await startFakeAnthropic();
  openai = await startFakeOpenAI();
  closed = `http://127.0.0.1:${await closedPort()}/v1`;
});

afterAll(async () => {
  await anthropic.close();
  await openai.close();
});

beforeEach(() => {
  anthropic.reset();
  openai.requests.length = 0;
});

/**
 * The child's environment: both hosted providers pointed at the fakes, the local probe at a closed
 * port (never the real default ports), and nothing else of the LLM settings inherited.
 */
function env(extra: Record<string, string | undefined> = {}) {
  return {
    ANTHROPIC_API_KEY: ANTHROPIC_KEY,
    ANTHROPIC_BASE_URL: anthropic.url,
    OPENAI_API_KEY: OPENAI_KEY,
    OPENAI_BASE_URL: openai.url,
    KEEL_LOCAL_BASE_URL: closed,
    KEEL_CONFIG: undefined,
    KEEL_DEGRADED: undefined,
    KEEL_ANTHROPIC_MODEL: undefined,
    KEEL_OPENAI_MODEL: undefined,
    KEEL_LOCAL_MODEL: undefined,
    KEEL_LOCAL_API_KEY: undefined,
    ...extra,
  };
}

const REFUSED_KEY = {
  status: 401,
  error: {
    message: `Incorrect API key provided: ${OPENAI_KEY}.`,
    type: 'invalid_request_error',
    code: 'invalid_api_key',
  },
};

const NOTES = () => [
  'no tiers configured: using the default chain',
  `anthropic: ANTHROPIC_API_KEY is set; model claude-sonnet-4-5 (default; KEEL_ANTHROPIC_MODEL picks another) at ${anthropic.url}`,
  `openai: OPENAI_API_KEY is set; model gpt-4.1-mini (default; KEEL_OPENAI_MODEL picks another) at ${openai.url}`,
  `local: none found (GET /models: ${closed} no answer within 300 ms)`,
  'degraded: the offline extractive tier comes last (KEEL_DEGRADED=off removes it)',
];

const answered = (tier: string, provider: string, model: string, degraded = false) => ({
  tier,
  provider,
  model,
  reachable: true,
  latencyMs: expect.any(Number) as number,
  errorClass: null,
  status: null,
  reason: null,
  degraded,
});

describe('keel doctor', () => {
  it('--json: one tier up, one refusing its key: exit 1, the refused one said loudly', async () => {
    openai.script(REFUSED_KEY);
    const result = await keel(['doctor', '--json'], { cwd, env: env() });
    expect(result.code).toBe(1);
    const report = JSON.parse(result.stdout) as DoctorReport;
    expect(report).toEqual({
      tiers: [
        answered('anthropic', 'anthropic', 'claude-sonnet-4-5'),
        {
          tier: 'openai',
          provider: 'openai',
          model: 'gpt-4.1-mini',
          reachable: false,
          latencyMs: null,
          errorClass: 'auth',
          status: 401,
          reason: '401 invalid_api_key',
          degraded: false,
        },
        answered('degraded', 'degraded', 'extractive', true),
      ],
      notes: NOTES(),
      problems: [
        'MISCONFIGURED: openai (openai gpt-4.1-mini): the key was refused (401 invalid_api_key), check OPENAI_API_KEY',
      ],
      shared: null,
    });
    // Each tier got the one-token ping, straight from its provider (no retry on the refusal).
    expect(anthropic.requests.map((r) => r.body)).toEqual([
      { model: 'claude-sonnet-4-5', max_tokens: 1, messages: [{ role: 'user', content: 'ping' }] },
    ]);
    expect(openai.requests.map((r) => r.body)).toEqual([
      { model: 'gpt-4.1-mini', messages: [{ role: 'user', content: 'ping' }], max_tokens: 1 },
    ]);
    for (const key of [ANTHROPIC_KEY, OPENAI_KEY]) {
      expect(result.stdout + result.stderr).not.toContain(key);
    }
  });

  it('prints the notes, the table and the misconfigured tier', async () => {
    openai.script(REFUSED_KEY);
    const result = await keel(['doctor'], { cwd, env: env() });
    expect(result.code).toBe(1);
    const lines = result.stdout.trimEnd().split('\n');
    expect(lines.slice(0, 7)).toEqual(['notes:', ...NOTES().map((n) => `  ${n}`), '']);
    const table = lines.slice(7, 11);
    expect(table[0]).toBe(
      'tier       provider   model              reachable  latency ms  error  reason',
    );
    expect(table[1]).toMatch(/^anthropic {2}anthropic {2}claude-sonnet-4-5 {2}yes {8}\d+$/);
    expect(table[2]).toBe(
      'openai     openai     gpt-4.1-mini       no         -           auth   401 invalid_api_key',
    );
    expect(table[3]).toMatch(/^degraded {3}degraded {3}extractive {9}yes {8}\d+$/);
    expect(lines.slice(11)).toEqual([
      '',
      'MISCONFIGURED: openai (openai gpt-4.1-mini): the key was refused (401 invalid_api_key), check OPENAI_API_KEY',
      '1 of 3 tiers did not answer',
    ]);
    expect(result.stdout).not.toContain(OPENAI_KEY);
  });

  it('exits 0 when every tier answers', async () => {
    const result = await keel(['doctor'], { cwd, env: env() });
    expect(result.code).toBe(0);
    expect(result.stdout.trimEnd().split('\n').at(-1)).toBe('ok: every tier answered');
    const json = await keel(['doctor', '--json'], { cwd, env: env() });
    expect(json.code).toBe(0);
    const report = JSON.parse(json.stdout) as DoctorReport;
    expect(report.tiers.map((t) => [t.tier, t.reachable, t.errorClass])).toEqual([
      ['anthropic', true, null],
      ['openai', true, null],
      ['degraded', true, null],
    ]);
    expect(report.problems).toEqual([]);
  });

  it('checks configured tiers under --timeout: a slow one times out, a wrong path is not found', async () => {
    const file = join(cwd, 'tiers.json');
    writeFileSync(
      file,
      JSON.stringify({
        llm: {
          tiers: [
            { name: 'slow', provider: 'anthropic', apiKeyEnv: 'SLOW_KEY' },
            // The Anthropic fake serves no chat completions: an OpenAI server without that route.
            {
              name: 'wrong',
              provider: 'openai-compatible',
              baseURL: `${anthropic.url}/v1`,
              model: 'qwen',
            },
            { name: 'unset', provider: 'openai', apiKeyEnv: 'NOT_SET_KEY' },
          ],
        },
      }),
    );
    anthropic.script([{ delayMs: 5000 }]);
    const result = await keel(['doctor', '--config', file, '--timeout', '400', '--json'], {
      cwd,
      env: env({ SLOW_KEY: 'slow-key-value-1234', NOT_SET_KEY: undefined }),
    });
    expect(result.code).toBe(1);
    const report = JSON.parse(result.stdout) as DoctorReport;
    expect(report).toEqual({
      tiers: [
        {
          tier: 'slow',
          provider: 'anthropic',
          model: 'claude-sonnet-4-5',
          reachable: false,
          latencyMs: null,
          errorClass: 'timeout',
          status: null,
          reason: 'no answer within 400 ms',
          degraded: false,
        },
        {
          tier: 'wrong',
          provider: 'openai-compatible',
          model: 'qwen',
          reachable: false,
          latencyMs: null,
          errorClass: 'not_found',
          status: 404,
          reason: '404 not_found_error',
          degraded: false,
        },
      ],
      notes: [
        '3 configured tiers',
        `slow: anthropic claude-sonnet-4-5 at ${anthropic.url} (key from SLOW_KEY)`,
        `wrong: openai-compatible qwen at ${anthropic.url}/v1 (no key needed)`,
        'unset: skipped, NOT_SET_KEY is not set; set it to use this tier',
      ],
      problems: [
        `UNREACHABLE: slow (anthropic claude-sonnet-4-5): no answer within 400 ms; is ${anthropic.url} up?`,
        `MISCONFIGURED: wrong (openai-compatible qwen): not found (404 not_found_error), check the model name and the base URL ${anthropic.url}/v1`,
      ],
      shared: null,
    });
    expect(result.stdout).not.toContain('slow-key-value-1234');
  });

  it('exits 1 with no tier at all', async () => {
    const result = await keel(['doctor', '--json'], {
      cwd,
      env: env({ ANTHROPIC_API_KEY: undefined, OPENAI_API_KEY: undefined, KEEL_DEGRADED: 'off' }),
    });
    expect(result.code).toBe(1);
    expect(JSON.parse(result.stdout)).toEqual({
      tiers: [],
      notes: [
        'no tiers configured: using the default chain',
        'anthropic: skipped, ANTHROPIC_API_KEY is not set',
        'openai: skipped, OPENAI_API_KEY is not set',
        `local: none found (GET /models: ${closed} no answer within 300 ms)`,
        'degraded: off, KEEL_DEGRADED is off',
      ],
      problems: [
        'NO TIER: set ANTHROPIC_API_KEY or OPENAI_API_KEY, start a local server, or configure tiers in keel.config.json',
      ],
      shared: null,
    });
  });

  it('exits 2 for a bad configuration, naming the field', async () => {
    const file = join(cwd, 'bad.json');
    writeFileSync(file, JSON.stringify({ llm: { tiers: [{ provider: 'mistral' }] } }));
    const result = await keel(['doctor', '--config', file], { cwd, env: env() });
    expect(result.code).toBe(2);
    expect(result.stdout).toBe('');
    expect(result.stderr).toBe(
      `keel: Invalid LLM configuration in ${file}: llm.tiers[0].provider is "mistral", which keel ` +
        'does not know.\n  Use one of: anthropic, openai, ollama, lmstudio, gemini, xai, ' +
        'openai-compatible, degraded.\n',
    );
    expect(anthropic.requests).toEqual([]);
  });

  it('exits 2 for a --timeout that is not a whole number', async () => {
    const result = await keel(['doctor', '--timeout', 'soon'], { cwd, env: env() });
    expect(result.code).toBe(2);
    expect(result.stderr).toContain(
      `error: option '--timeout <ms>' argument 'soon' is invalid. --timeout takes a whole number of milliseconds, got "soon".`,
    );
  });
});

describe('shared tier state', () => {
  it('lists the breakers and cooldowns every process on the database shares, and --reset clears them', async () => {
    const db = join(cwd, 'shared.db');
    const store = openSqliteStore(db);
    const later = Date.now() + 3_600_000;
    await store.updateTierState('openai', (s) => ({ ...s, downUntil: later, updatedAt: 1 }));
    await store.updateTierState('anthropic', (s) => ({
      ...s,
      breaker: 'open',
      failures: 3,
      openUntil: later,
      updatedAt: 1,
    }));
    await store.close();
    const shown = await keel(['doctor', '--db', db, '--json'], { cwd, env: env() });
    const report = JSON.parse(shown.stdout) as {
      shared: { reset: boolean; tiers: { tier: string; breaker: string; downUntil: number }[] };
    };
    expect(report.shared.reset).toBe(false);
    expect(report.shared.tiers.map((t) => [t.tier, t.breaker, t.downUntil])).toEqual([
      ['anthropic', 'open', 0],
      ['openai', 'closed', later],
    ]);
    const text = await keel(['doctor', '--db', db], { cwd, env: env() });
    expect(text.stdout).toContain('clear it with `keel doctor --reset`');
    const reset = await keel(['doctor', '--db', db, '--reset', '--json'], { cwd, env: env() });
    const after = JSON.parse(reset.stdout) as typeof report;
    expect(after.shared.reset).toBe(true);
    expect(after.shared.tiers.map((t) => [t.tier, t.breaker, t.downUntil])).toEqual([
      ['anthropic', 'closed', 0],
      ['openai', 'closed', 0],
    ]);
  });
});
