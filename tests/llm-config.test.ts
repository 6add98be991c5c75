import { writeFileSync } from 'node:fs';
import { createServer, type IncomingMessage, type ServerResponse } from 'node:http';
import { createServer as createNetServer, type AddressInfo } from 'node:net';
import { join } from 'node:path';
import { afterAll, beforeAll, beforeEach, describe, expect, it } from 'vitest';
import {
  buildTiers,
  jsonSyntaxError,
  loadLlmConfig,
  parseLlmConfig,
  routerOptionsFrom,
  type ConfiguredTier,
  type Env,
  type LlmConfig,
} from '../adapters/llm/config.ts';
import type { LlmRequest } from '../engine/llm/types.ts';
import { startFakeAnthropic, type FakeAnthropic } from './support/fake-anthropic.ts';
import { startFakeOpenAI, type FakeOpenAI } from './support/fake-openai.ts';
import { tempDir } from './support/index.ts';

const ANTHROPIC_KEY = 'sk-ant-api03-test-1a2b3c4d5e6f7a8b';
const OPENAI_KEY = 'sk-proj-test-9z8y7x6w5v4u3t2s';
const TEAM_KEY = 'team-key-6f1e2d3c';
const BACKUP_KEY = 'backup-key-0a9b8c7d';

const KEY_HINT =
  'Put the key in an environment variable and name that variable with "apiKeyEnv", e.g. ' +
  '"apiKeyEnv": "ANTHROPIC_API_KEY".';

const HELLO: LlmRequest = { maxTokens: 5, messages: [{ role: 'user', content: 'hello' }] };

/** A tiny OpenAI-compatible local server: `GET /v1/models` and a minimal chat completion. */
type LocalServer = {
  url: string;
  requests: { method: string; path: string; body: unknown; authorization?: string }[];
};

const servers: { close(): unknown }[] = [];

async function startLocal(options: { models?: string[]; status?: number; raw?: string } = {}) {
  const requests: LocalServer['requests'] = [];
  const server = createServer((req: IncomingMessage, res: ServerResponse) => {
    const chunks: Buffer[] = [];
    req.on('data', (c: Buffer) => chunks.push(c));
    req.on('end', () => {
      const raw = Buffer.concat(chunks).toString('utf8');
      const body: unknown = raw ? JSON.parse(raw) : undefined;
      const request: LocalServer['requests'][number] = {
        method: req.method ?? '',
        path: req.url ?? '',
        body,
      };
      if (req.headers.authorization) request.authorization = req.headers.authorization;
      requests.push(request);
      const send = (status: number, payload: unknown) => {
        res.writeHead(status, { 'content-type': 'application/json' });
        res.end(JSON.stringify(payload));
      };
      if (options.raw !== undefined) {
        res.writeHead(200, { 'content-type': 'text/plain' });
        res.end(options.raw);
      } else if (options.status !== undefined) {
        send(options.status, { error: { message: 'no', type: 'invalid_request_error' } });
      } else if (req.method === 'GET' && req.url === '/v1/models') {
        const data = (options.models ?? []).map((id) => ({ id, object: 'model', owned_by: 'me' }));
        send(200, { object: 'list', data });
      } else if (req.method === 'POST' && req.url === '/v1/chat/completions') {
        const model = (body as { model: string }).model;
        send(200, {
          id: 'local-1',
          object: 'chat.completion',
          created: 1,
          model,
          choices: [
            {
              index: 0,
              message: { role: 'assistant', content: 'local answer', refusal: null },
              finish_reason: 'stop',
              logprobs: null,
            },
          ],
          usage: { prompt_tokens: 3, completion_tokens: 2, total_tokens: 5 },
        });
      } else {
        send(404, { error: { message: 'not found', type: 'invalid_request_error' } });
      }
    });
  });
  await new Promise<void>((r) => server.listen(0, '127.0.0.1', r));
  servers.push({ close: () => new Promise((r) => server.close(r)) });
  const { port } = server.address() as AddressInfo;
  return { url: `http://127.0.0.1:${port}/v1`, requests };
}

/** A loopback port with nothing listening on it. */
async function closedPort(): Promise<number> {
  const probe = createNetServer();
  await new Promise<void>((r) => probe.listen(0, '127.0.0.1', r));
  const { port } = probe.address() as AddressInfo;
  await new Promise<void>((r) => probe.close(() => r()));
  return port;
}

function thrown(fn: () => unknown): Error {
  try {
    fn();
  } catch (err) {
    return err as Error;
  }
  throw new Error('expected an error');
}

async function rejected(p: Promise<unknown>): Promise<Error> {
  try {
    await p;
  } catch (err) {
    return err as Error;
  }
  throw new Error('expected a rejection');
}

let anthropic: FakeAnthropic;
let openai: FakeOpenAI;
let local: LocalServer;
let closed: string;

beforeAll(async () => {
  anthropic = await startFakeAnthropic();
  openai = await startFakeOpenAI();
  local = await startLocal({ models: ['qwen2.5:0.5b', 'llama3.2'] });
  closed = `http://127.0.0.1:${await closedPort()}/v1`;
});

afterAll(async () => {
  await anthropic.close();
  await openai.close();
  await Promise.all(servers.map((s) => s.close()));
});

beforeEach(() => {
  anthropic.reset();
  openai.requests.length = 0;
  local.requests.length = 0;
});

describe('configuration validation', () => {
  const problem = (path: string, what: string, hint: string) =>
    `Invalid LLM configuration in test.json: ${path} ${what}.\n  ${hint}`;

  const cases: [string, unknown, string][] = [
    [
      'a key in the file',
      { tiers: [{ provider: 'anthropic', apiKey: 'anything' }] },
      problem('llm.tiers[0].apiKey', 'is not allowed: keys never go in configuration', KEY_HINT),
    ],
    [
      'a key-looking string in any field',
      { tiers: [{ provider: 'openai', model: OPENAI_KEY }] },
      problem(
        'llm.tiers[0].model',
        'holds what looks like an API key; keys never go in configuration',
        KEY_HINT,
      ),
    ],
    [
      'something that is no variable name in apiKeyEnv',
      { tiers: [{ provider: 'anthropic', apiKeyEnv: 'abc-123 secret' }] },
      problem(
        'llm.tiers[0].apiKeyEnv',
        'must be the name of an environment variable (letters, digits and _), not a key',
        KEY_HINT,
      ),
    ],
    [
      'credentials in a base URL',
      { tiers: [{ provider: 'openai', baseURL: 'http://me:pw@127.0.0.1:9/v1' }] },
      problem(
        'llm.tiers[0].baseURL',
        'carries credentials; keys never go in configuration',
        KEY_HINT,
      ),
    ],
    [
      'an unknown provider',
      { tiers: [{ provider: 'mistral' }] },
      problem(
        'llm.tiers[0].provider',
        'is "mistral", which keel does not know',
        'Use one of: anthropic, openai, ollama, lmstudio, gemini, xai, openai-compatible, degraded.',
      ),
    ],
    [
      'a tier without provider',
      { tiers: [{ provider: 'openai' }, { model: 'x' }] },
      problem(
        'llm.tiers[1].provider',
        'is missing',
        'Set it to one of: anthropic, openai, ollama, lmstudio, gemini, xai, openai-compatible, degraded.',
      ),
    ],
    [
      'duplicate tier names',
      {
        tiers: [
          { name: 'main', provider: 'anthropic' },
          { provider: 'openai' },
          { name: 'main', provider: 'openai' },
        ],
      },
      problem(
        'llm.tiers[2].name',
        '"main" is already the name of llm.tiers[0]',
        'Tier names must be unique; rename one of them.',
      ),
    ],
    [
      'a negative wait',
      { maxRetryAfterMs: -5 },
      problem(
        'llm.maxRetryAfterMs',
        'must be a number >= 0 (milliseconds), got -5',
        'Set it to a non-negative number, or leave it out for the default.',
      ),
    ],
    [
      'a negative price',
      { tiers: [{ provider: 'anthropic', price: { input: 3, output: -1 } }] },
      problem(
        'llm.tiers[0].price.output',
        'must be a number >= 0 (US dollars per million tokens), got -1',
        'Set it to a non-negative number, or leave it out for the default.',
      ),
    ],
    [
      'a price without output',
      { tiers: [{ provider: 'anthropic', price: { input: 3 } }] },
      problem(
        'llm.tiers[0].price',
        'needs both "input" and "output"',
        'Prices are US dollars per million tokens, e.g. { "input": 3, "output": 15 }.',
      ),
    ],
    [
      'a zero budget',
      { budget: 0 },
      problem(
        'llm.budget',
        'must be a whole number of at least 1, got 0',
        'It is the most requests one call may send, over all tiers, e.g. 4.',
      ),
    ],
    [
      'a zero timeout',
      { timeouts: { totalMs: 0 } },
      problem(
        'llm.timeouts.totalMs',
        'must be a number > 0 (milliseconds), got 0',
        'Set it to a positive number, or leave it out for the default.',
      ),
    ],
    [
      'an unknown setting',
      { tier: [] },
      problem(
        'llm.tier',
        'is not a known setting',
        'Known settings: tiers, budget, maxRetryAfterMs, timeouts, hedgeAfterMs, breaker, quotaCooldownMs, degraded, maxInFlight, sameTierRetries, streamPlainCalls.',
      ),
    ],
    [
      'an unknown tier field',
      { tiers: [{ provider: 'openai', temperature: 0 }] },
      problem(
        'llm.tiers[0].temperature',
        'is not a known setting',
        'Known settings: name, provider, model, baseURL, apiKeyEnv, contextWindow, price, maxRetryAfterMs, connectTimeoutMs, maxInFlight.',
      ),
    ],
    [
      'an unknown breaker field',
      { breaker: { threshold: 3 } },
      problem(
        'llm.breaker.threshold',
        'is not a known setting',
        'Known settings: failureThreshold, cooldownMs.',
      ),
    ],
    [
      'openai-compatible without baseURL',
      { tiers: [{ provider: 'openai-compatible', model: 'qwen' }] },
      problem(
        'llm.tiers[0].baseURL',
        'is required for provider openai-compatible',
        'Give the server address, e.g. "baseURL": "http://127.0.0.1:8000/v1".',
      ),
    ],
    [
      'ollama without model',
      { tiers: [{ provider: 'ollama' }] },
      problem(
        'llm.tiers[0].model',
        'is required for provider ollama',
        'Name the model the server serves, e.g. "model": "llama3.2".',
      ),
    ],
    [
      'a base URL that is not http',
      { tiers: [{ provider: 'openai', baseURL: 'ftp://127.0.0.1/v1' }] },
      problem(
        'llm.tiers[0].baseURL',
        'must be an http:// or https:// URL',
        'E.g. "http://127.0.0.1:8000/v1".',
      ),
    ],
    [
      'a model on the degraded tier',
      { tiers: [{ provider: 'degraded', model: 'x' }] },
      problem(
        'llm.tiers[0].model',
        'does not apply to the degraded tier',
        'The degraded tier runs offline with no model, server or key; remove the field.',
      ),
    ],
    [
      'a degraded tier with degraded: false',
      { degraded: false, tiers: [{ provider: 'anthropic' }, { provider: 'degraded' }] },
      problem(
        'llm.tiers[1]',
        'is a degraded tier, but llm.degraded is false',
        'Remove the degraded tier or the "degraded": false setting.',
      ),
    ],
    [
      'llm that is not an object',
      'anthropic',
      problem(
        'llm',
        'must be an object',
        'For example: "llm": { "tiers": [{ "provider": "anthropic" }] }.',
      ),
    ],
    [
      'a context window that is not whole',
      { tiers: [{ provider: 'anthropic', contextWindow: 1.5 }] },
      problem(
        'llm.tiers[0].contextWindow',
        'must be a whole number of at least 1, got 1.5',
        "Set it to the model's context window in tokens, e.g. 200000.",
      ),
    ],
  ];

  for (const [what, value, message] of cases) {
    it(`refuses ${what}`, () => {
      const err = thrown(() => parseLlmConfig(value, 'test.json'));
      expect(err.name).toBe('InputError');
      expect(err.message).toBe(message);
    });
  }

  it('never quotes the key it refuses', () => {
    const err = thrown(() =>
      parseLlmConfig({ tiers: [{ provider: 'openai', name: `x ${OPENAI_KEY}` }] }, 'test.json'),
    );
    expect(err.message).not.toContain(OPENAI_KEY);
    expect(err.message).not.toContain('9z8y7x');
  });

  it('returns a clean copy of a valid configuration', () => {
    const value = {
      tiers: [
        {
          name: 'main',
          provider: 'anthropic',
          model: 'claude-sonnet-4-5',
          apiKeyEnv: 'TEAM_KEY',
          contextWindow: 200000,
          price: { input: 3, output: 15, cacheRead: 0.3 },
          maxRetryAfterMs: 5000,
          connectTimeoutMs: 2000,
        },
        { provider: 'ollama', model: 'llama3.2' },
        { provider: 'degraded' },
      ],
      budget: 6,
      maxRetryAfterMs: 30000,
      timeouts: { connectMs: 5000, totalMs: 60000 },
      hedgeAfterMs: 1500,
      breaker: { failureThreshold: 2, cooldownMs: 10000 },
      quotaCooldownMs: 600000,
      degraded: true,
    };
    const config = parseLlmConfig(value, 'test.json');
    expect(config).toEqual(value);
    expect(config.tiers![0]).not.toBe(value.tiers[0]);
  });
});

describe('loadLlmConfig', () => {
  const dir = tempDir('keel-config-');
  const write = (name: string, text: string) => {
    writeFileSync(join(dir, name), text);
    return join(dir, name);
  };

  it('is undefined with no keel.config.json, or one without an llm key', () => {
    const empty = tempDir('keel-config-empty-');
    expect(loadLlmConfig({ cwd: empty, env: {} })).toBeUndefined();
    const other = tempDir('keel-config-other-');
    writeFileSync(join(other, 'keel.config.json'), '{ "db": "x.db" }');
    expect(loadLlmConfig({ cwd: other, env: {} })).toBeUndefined();
  });

  it('reads the llm key of keel.config.json in cwd, of KEEL_CONFIG, or of the file given', () => {
    const cwd = tempDir('keel-config-cwd-');
    writeFileSync(join(cwd, 'keel.config.json'), '{ "llm": { "budget": 2 } }');
    writeFileSync(join(cwd, 'other.json'), '{ "llm": { "budget": 3 } }');
    write('given.json', '{ "llm": { "budget": 5 } }');
    expect(loadLlmConfig({ cwd, env: {} })).toEqual({ budget: 2 });
    expect(loadLlmConfig({ cwd, env: { KEEL_CONFIG: 'other.json' } })).toEqual({ budget: 3 });
    expect(
      loadLlmConfig({ cwd, file: join(dir, 'given.json'), env: { KEEL_CONFIG: 'other.json' } }),
    ).toEqual({ budget: 5 });
  });

  it('names the file, line and column of malformed JSON', () => {
    const file = write('bad.json', '{\n  "llm": {\n    "tiers": [,]\n  }\n}');
    const err = thrown(() => loadLlmConfig({ cwd: dir, file, env: {} }));
    expect(err.name).toBe('InputError');
    expect(err.message).toBe(
      `${file} is not valid JSON: expected a value at line 3, column 15.\n` +
        '  Fix the file: JSON has no comments and no trailing commas.',
    );
  });

  it('says where a trailing comma is', () => {
    const file = write('comma.json', '{"llm": {},}');
    expect(thrown(() => loadLlmConfig({ cwd: dir, file, env: {} })).message).toBe(
      `${file} is not valid JSON: expected a property name in double quotes at line 1, column 12.\n` +
        '  Fix the file: JSON has no comments and no trailing commas.',
    );
  });

  it('does not quote a key pasted into a malformed file', () => {
    const file = write(
      'pasted.json',
      `{"llm": {"tiers": [{"provider": "anthropic", "k": ${ANTHROPIC_KEY}}]}}`,
    );
    const err = thrown(() => loadLlmConfig({ cwd: dir, file, env: {} }));
    expect(err.message).toBe(
      `${file} is not valid JSON: expected a value at line 1, column 51.\n` +
        '  Fix the file: JSON has no comments and no trailing commas.',
    );
    expect(err.message).not.toContain('1a2b3c');
  });

  it('refuses a file named explicitly that does not exist', () => {
    const missing = join(dir, 'missing.json');
    expect(thrown(() => loadLlmConfig({ cwd: dir, file: missing, env: {} })).message).toBe(
      `Configuration file ${missing} does not exist.\n  Check the path given to --config.`,
    );
    expect(
      thrown(() => loadLlmConfig({ cwd: dir, env: { KEEL_CONFIG: 'missing.json' } })).message,
    ).toBe(
      `Configuration file ${missing} does not exist.\n` +
        '  Check KEEL_CONFIG, or unset it to use keel.config.json in the current folder.',
    );
  });

  it('refuses a file that is not a JSON object, and validates the llm key with the file name', () => {
    const list = write('list.json', '[1]');
    expect(thrown(() => loadLlmConfig({ cwd: dir, file: list, env: {} })).message).toBe(
      `${list} must hold a JSON object.\n` +
        '  For example: { "llm": { "tiers": [{ "provider": "anthropic" }] } }.',
    );
    const bad = write('bad-llm.json', '{ "llm": { "budget": -1 } }');
    expect(thrown(() => loadLlmConfig({ cwd: dir, file: bad, env: {} })).message).toBe(
      `Invalid LLM configuration in ${bad}: llm.budget must be a whole number of at least 1, got -1.\n` +
        '  It is the most requests one call may send, over all tiers, e.g. 4.',
    );
  });

  it('locates the first JSON error the way a reader counts', () => {
    expect(jsonSyntaxError('{"a": [1, 2,]}')).toEqual({ offset: 12, expected: 'a value' });
    expect(jsonSyntaxError('{"a": "x\n"}')).toEqual({
      offset: 8,
      expected: 'the closing quote of the string',
    });
    expect(jsonSyntaxError('{"a": 1} x')).toEqual({ offset: 9, expected: 'the end of the file' });
    expect(jsonSyntaxError('{"a": 1')).toEqual({ offset: 7, expected: "',' or '}'" });
    expect(jsonSyntaxError('{"a": [true, null, -1.5e3, "\\u00e9"]}')).toBeUndefined();
  });
});

/** What a test can see of a built tier. */
function summary(t: ConfiguredTier) {
  return {
    name: t.name,
    kind: t.kind,
    provider: t.provider.name,
    model: t.provider.model,
    baseURL: t.baseURL,
    keyEnv: t.keyEnv,
    degraded: t.degraded,
    contextWindow: t.contextWindow,
    price: t.price,
    maxRetryAfterMs: t.maxRetryAfterMs,
    connectTimeoutMs: t.connectTimeoutMs,
  };
}

const DEGRADED_SUMMARY = {
  name: 'degraded',
  kind: 'degraded',
  provider: 'degraded',
  model: 'extractive',
  baseURL: undefined,
  keyEnv: undefined,
  degraded: true,
  contextWindow: Number.MAX_SAFE_INTEGER,
  price: { input: 0, output: 0 },
  maxRetryAfterMs: undefined,
  connectTimeoutMs: undefined,
};

const hosted = (over: Partial<ReturnType<typeof summary>>) => ({
  keyEnv: undefined,
  degraded: undefined,
  contextWindow: undefined,
  price: undefined,
  maxRetryAfterMs: undefined,
  connectTimeoutMs: undefined,
  ...over,
});

describe('the default chain', () => {
  const fullEnv = (): Env => ({
    ANTHROPIC_API_KEY: ANTHROPIC_KEY,
    ANTHROPIC_BASE_URL: anthropic.url,
    OPENAI_API_KEY: OPENAI_KEY,
    OPENAI_BASE_URL: openai.url,
    KEEL_LOCAL_BASE_URL: local.url,
  });

  it('is Anthropic, OpenAI, the local server that answers, then the degraded tier', async () => {
    const { tiers, notes } = await buildTiers(undefined, { env: fullEnv() });
    expect(tiers.map(summary)).toEqual([
      hosted({
        name: 'anthropic',
        kind: 'anthropic',
        provider: 'anthropic',
        model: 'claude-sonnet-4-5',
        baseURL: anthropic.url,
        keyEnv: 'ANTHROPIC_API_KEY',
      }),
      hosted({
        name: 'openai',
        kind: 'openai',
        provider: 'openai',
        model: 'gpt-4.1-mini',
        baseURL: openai.url,
        keyEnv: 'OPENAI_API_KEY',
      }),
      hosted({
        name: 'local',
        kind: 'openai-compatible',
        provider: 'local',
        model: 'qwen2.5:0.5b',
        baseURL: local.url,
      }),
      DEGRADED_SUMMARY,
    ]);
    expect(notes).toEqual([
      'no tiers configured: using the default chain',
      `anthropic: ANTHROPIC_API_KEY is set; model claude-sonnet-4-5 (default; KEEL_ANTHROPIC_MODEL picks another) at ${anthropic.url}`,
      `openai: OPENAI_API_KEY is set; model gpt-4.1-mini (default; KEEL_OPENAI_MODEL picks another) at ${openai.url}`,
      `local: ${local.url} answers; model qwen2.5:0.5b (the first it lists; KEEL_LOCAL_MODEL picks another)`,
      'degraded: the offline extractive tier comes last (KEEL_DEGRADED=off removes it)',
    ]);
    expect(local.requests).toEqual([{ method: 'GET', path: '/v1/models', body: undefined }]);
  });

  it('wires each tier to its server, model and key', async () => {
    const { tiers } = await buildTiers(undefined, { env: fullEnv() });
    const answers = await Promise.all(tiers.map((t) => t.provider.complete(HELLO)));
    expect(answers.map((a) => [a.provider, a.model, a.text, a.degraded])).toEqual([
      ['anthropic', 'claude-sonnet-4-5', 'ok', false],
      ['openai', 'gpt-4.1-mini', 'default answer', false],
      ['local', 'qwen2.5:0.5b', 'local answer', false],
      ['degraded', 'extractive', '', true],
    ]);
    expect(anthropic.requests[0]!.headers.authorization).toBe(`Bearer ${ANTHROPIC_KEY}`);
    expect((anthropic.requests[0]!.body as { model: string }).model).toBe('claude-sonnet-4-5');
    expect(openai.requests[0]!.headers.authorization).toBe(`Bearer ${OPENAI_KEY}`);
    expect(local.requests.map((r) => [r.method, r.path])).toEqual([
      ['GET', '/v1/models'],
      ['POST', '/v1/chat/completions'],
    ]);
    expect((local.requests[1]!.body as { model: string }).model).toBe('qwen2.5:0.5b');
  });

  it('takes the models from KEEL_ANTHROPIC_MODEL, KEEL_OPENAI_MODEL and KEEL_LOCAL_MODEL', async () => {
    const env = {
      ...fullEnv(),
      KEEL_ANTHROPIC_MODEL: 'claude-haiku-4-5',
      KEEL_OPENAI_MODEL: 'gpt-4.1',
      KEEL_LOCAL_MODEL: 'llama3.2',
    };
    const { tiers, notes } = await buildTiers(undefined, { env });
    expect(tiers.map((t) => t.provider.model)).toEqual([
      'claude-haiku-4-5',
      'gpt-4.1',
      'llama3.2',
      'extractive',
    ]);
    expect(notes.slice(1, 4)).toEqual([
      `anthropic: ANTHROPIC_API_KEY is set; model claude-haiku-4-5 (from KEEL_ANTHROPIC_MODEL) at ${anthropic.url}`,
      `openai: OPENAI_API_KEY is set; model gpt-4.1 (from KEEL_OPENAI_MODEL) at ${openai.url}`,
      `local: ${local.url} answers; model llama3.2 (from KEEL_LOCAL_MODEL)`,
    ]);
  });

  it('skips what has no key and no local tier when nothing answers the probe', async () => {
    const { tiers, notes } = await buildTiers(undefined, {
      env: { OPENAI_API_KEY: OPENAI_KEY, OPENAI_BASE_URL: openai.url, KEEL_LOCAL_BASE_URL: closed },
    });
    expect(tiers.map((t) => t.name)).toEqual(['openai', 'degraded']);
    expect(notes).toEqual([
      'no tiers configured: using the default chain',
      'anthropic: skipped, ANTHROPIC_API_KEY is not set',
      `openai: OPENAI_API_KEY is set; model gpt-4.1-mini (default; KEEL_OPENAI_MODEL picks another) at ${openai.url}`,
      `local: none found (GET /models: ${closed} no answer within 300 ms)`,
      'degraded: the offline extractive tier comes last (KEEL_DEGRADED=off removes it)',
    ]);
  });

  it('with no key, no local server and KEEL_DEGRADED=off, has no tier at all', async () => {
    const { tiers, notes } = await buildTiers(undefined, {
      env: { KEEL_LOCAL_BASE_URL: closed, KEEL_DEGRADED: 'off' },
    });
    expect(tiers).toEqual([]);
    expect(notes).toEqual([
      'no tiers configured: using the default chain',
      'anthropic: skipped, ANTHROPIC_API_KEY is not set',
      'openai: skipped, OPENAI_API_KEY is not set',
      `local: none found (GET /models: ${closed} no answer within 300 ms)`,
      'degraded: off, KEEL_DEGRADED is off',
    ]);
  });

  it('leaves the degraded tier out with "degraded": false, and KEEL_DEGRADED wins', async () => {
    const config: LlmConfig = { degraded: false };
    const off = await buildTiers(config, { env: {}, probe: false });
    expect(off.tiers).toEqual([]);
    expect(off.notes.slice(-2)).toEqual([
      'local: not probed',
      'degraded: off, llm.degraded is false',
    ]);
    const on = await buildTiers(config, { env: { KEEL_DEGRADED: 'on' }, probe: false });
    expect(on.tiers.map((t) => t.name)).toEqual(['degraded']);
  });

  it('refuses a KEEL_DEGRADED that is neither on nor off', async () => {
    const err = await rejected(
      buildTiers(undefined, { env: { KEEL_DEGRADED: 'maybe', KEEL_LOCAL_BASE_URL: local.url } }),
    );
    expect(err.message).toBe(
      'KEEL_DEGRADED must be on or off.\n' +
        '  Set KEEL_DEGRADED=off to leave the offline degraded tier out, or unset it.',
    );
    expect(local.requests).toEqual([]);
  });

  it('says when the local server refuses the probe or lists no model', async () => {
    const refusing = await startLocal({ status: 401 });
    const empty = await startLocal({ models: [] });
    const a = await buildTiers(undefined, { env: { KEEL_LOCAL_BASE_URL: refusing.url } });
    expect(a.tiers.map((t) => t.name)).toEqual(['degraded']);
    expect(a.notes[3]).toBe(`local: none found (GET /models: ${refusing.url} answered 401)`);
    const b = await buildTiers(undefined, { env: { KEEL_LOCAL_BASE_URL: empty.url } });
    expect(b.tiers.map((t) => t.name)).toEqual(['degraded']);
    expect(b.notes[3]).toBe(
      `local: ${empty.url} answers but lists no model; load one or set KEEL_LOCAL_MODEL`,
    );
  });

  it('says when the local server answers the probe with something else than a model list', async () => {
    const odd = await startLocal({ raw: 'hello' });
    const { tiers, notes } = await buildTiers(undefined, { env: { KEEL_LOCAL_BASE_URL: odd.url } });
    expect(tiers.map((t) => t.name)).toEqual(['degraded']);
    expect(notes[3]).toBe(
      `local: none found (GET /models: ${odd.url} answered, but with no JSON model list)`,
    );
  });

  it('sends KEEL_LOCAL_API_KEY to the local server, in the probe and in requests', async () => {
    const { tiers } = await buildTiers(undefined, {
      env: { KEEL_LOCAL_BASE_URL: local.url, KEEL_LOCAL_API_KEY: BACKUP_KEY },
    });
    await tiers[0]!.provider.complete(HELLO);
    expect(local.requests.map((r) => [r.path, r.authorization])).toEqual([
      ['/v1/models', `Bearer ${BACKUP_KEY}`],
      ['/v1/chat/completions', `Bearer ${BACKUP_KEY}`],
    ]);
  });

  it('refuses a KEEL_LOCAL_BASE_URL that is not an http URL', async () => {
    const err = await rejected(
      buildTiers(undefined, { env: { KEEL_LOCAL_BASE_URL: '127.0.0.1:11434' } }),
    );
    expect(err.message).toBe(
      'KEEL_LOCAL_BASE_URL is not an http(s) URL without credentials.\n' +
        "  Set it to the API's address, e.g. http://127.0.0.1:11434/v1, or unset it.",
    );
  });

  it('sends no probe when asked not to', async () => {
    const { notes } = await buildTiers(undefined, {
      env: { KEEL_LOCAL_BASE_URL: local.url },
      probe: false,
    });
    expect(notes[3]).toBe('local: not probed');
    expect(local.requests).toEqual([]);
  });

  it('refuses a base URL variable that is not an http URL, without quoting it', async () => {
    const err = await rejected(
      buildTiers(undefined, {
        env: { ANTHROPIC_API_KEY: ANTHROPIC_KEY, ANTHROPIC_BASE_URL: `key=${ANTHROPIC_KEY}` },
        probe: false,
      }),
    );
    expect(err.message).toBe(
      'ANTHROPIC_BASE_URL is not an http(s) URL without credentials.\n' +
        "  Set it to the API's address, e.g. https://api.anthropic.com, or unset it.",
    );
  });
});

describe('configured tiers', () => {
  const config = (): LlmConfig => ({
    tiers: [
      {
        provider: 'anthropic',
        apiKeyEnv: 'TEAM_ANTHROPIC_KEY',
        contextWindow: 200000,
        price: { input: 3, output: 15 },
        maxRetryAfterMs: 5000,
        connectTimeoutMs: 2000,
      },
      {
        name: 'backup',
        provider: 'openai-compatible',
        baseURL: openai.url,
        model: 'qwen',
        apiKeyEnv: 'BACKUP_KEY',
      },
      { provider: 'openai' },
      {
        provider: 'anthropic',
        model: 'claude-haiku-4-5',
        apiKeyEnv: 'TEAM_ANTHROPIC_KEY',
        baseURL: anthropic.url,
      },
      { provider: 'degraded' },
    ],
  });
  const env = (): Env => ({
    TEAM_ANTHROPIC_KEY: TEAM_KEY,
    BACKUP_KEY,
    ANTHROPIC_BASE_URL: anthropic.url,
    // Set, but the configured tiers replace the default chain: nothing is probed.
    KEEL_LOCAL_BASE_URL: local.url,
  });

  it('are built in order, a tier without its key skipped with a note, names made unique', async () => {
    const { tiers, notes } = await buildTiers(config(), { env: env() });
    expect(tiers.map(summary)).toEqual([
      hosted({
        name: 'anthropic',
        kind: 'anthropic',
        provider: 'anthropic',
        model: 'claude-sonnet-4-5',
        baseURL: anthropic.url,
        keyEnv: 'TEAM_ANTHROPIC_KEY',
        contextWindow: 200000,
        price: { input: 3, output: 15 },
        maxRetryAfterMs: 5000,
        connectTimeoutMs: 2000,
      }),
      hosted({
        name: 'backup',
        kind: 'openai-compatible',
        provider: 'openai-compatible',
        model: 'qwen',
        baseURL: openai.url,
        keyEnv: 'BACKUP_KEY',
      }),
      hosted({
        name: 'anthropic-2',
        kind: 'anthropic',
        provider: 'anthropic',
        model: 'claude-haiku-4-5',
        baseURL: anthropic.url,
        keyEnv: 'TEAM_ANTHROPIC_KEY',
      }),
      DEGRADED_SUMMARY,
    ]);
    expect(notes).toEqual([
      '5 configured tiers',
      `anthropic: anthropic claude-sonnet-4-5 at ${anthropic.url} (key from TEAM_ANTHROPIC_KEY)`,
      `backup: openai-compatible qwen at ${openai.url} (key from BACKUP_KEY)`,
      'openai: skipped, OPENAI_API_KEY is not set; set it to use this tier',
      `anthropic-2: anthropic claude-haiku-4-5 at ${anthropic.url} (key from TEAM_ANTHROPIC_KEY)`,
      'degraded: the offline degraded tier (extracts sentences, no model)',
    ]);
    expect(local.requests).toEqual([]);
  });

  it('send each tier’s key from its own variable', async () => {
    const { tiers } = await buildTiers(config(), { env: env() });
    await tiers[0]!.provider.complete(HELLO);
    await tiers[1]!.provider.complete(HELLO);
    expect(anthropic.requests[0]!.headers.authorization).toBe(`Bearer ${TEAM_KEY}`);
    expect(openai.requests[0]!.headers.authorization).toBe(`Bearer ${BACKUP_KEY}`);
    expect((openai.requests[0]!.body as { model: string }).model).toBe('qwen');
  });

  it('KEEL_DEGRADED=off skips a configured degraded tier', async () => {
    const { tiers, notes } = await buildTiers(config(), {
      env: { ...env(), KEEL_DEGRADED: 'off' },
    });
    expect(tiers.map((t) => t.name)).toEqual(['anthropic', 'backup', 'anthropic-2']);
    expect(notes.at(-1)).toBe('degraded: skipped, KEEL_DEGRADED is off');
  });

  it('are validated when handed over directly', async () => {
    const err = await rejected(
      buildTiers({ tiers: [{ provider: 'nope' }] } as unknown as LlmConfig, { env: {} }),
    );
    expect(err.message).toBe(
      'Invalid LLM configuration in configuration: llm.tiers[0].provider is "nope", which keel ' +
        'does not know.\n  Use one of: anthropic, openai, ollama, lmstudio, gemini, xai, ' +
        'openai-compatible, degraded.',
    );
  });

  it('never put a key in a note', async () => {
    const builds = await Promise.all([
      buildTiers(config(), { env: { ...env(), OPENAI_API_KEY: OPENAI_KEY } }),
      buildTiers(undefined, {
        env: {
          ANTHROPIC_API_KEY: ANTHROPIC_KEY,
          ANTHROPIC_BASE_URL: anthropic.url,
          OPENAI_API_KEY: OPENAI_KEY,
          OPENAI_BASE_URL: openai.url,
          KEEL_LOCAL_BASE_URL: local.url,
          KEEL_LOCAL_API_KEY: BACKUP_KEY,
        },
      }),
    ]);
    const text = JSON.stringify(builds.map((b) => b.notes));
    for (const key of [ANTHROPIC_KEY, OPENAI_KEY, TEAM_KEY, BACKUP_KEY]) {
      expect(text).not.toContain(key);
    }
    expect(builds[0].tiers.map((t) => t.name)).toContain('openai');
  });
});

describe('routerOptionsFrom', () => {
  it('copies the router settings that are set, and nothing else', () => {
    const config = parseLlmConfig({
      tiers: [{ provider: 'anthropic' }],
      budget: 6,
      maxRetryAfterMs: 30000,
      timeouts: { firstTokenMs: 8000 },
      hedgeAfterMs: 1500,
      breaker: { cooldownMs: 10000 },
      quotaCooldownMs: 600000,
      degraded: false,
    });
    expect(routerOptionsFrom(config)).toEqual({
      budget: 6,
      maxRetryAfterMs: 30000,
      breaker: { cooldownMs: 10000 },
      quotaCooldownMs: 600000,
      timeouts: { firstTokenMs: 8000 },
      hedgeAfterMs: 1500,
    });
    expect(routerOptionsFrom({ budget: 2 })).toEqual({ budget: 2 });
    expect(routerOptionsFrom(undefined)).toEqual({});
  });
});
