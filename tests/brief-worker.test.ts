/**
 * The main job under `keel worker`: 50 `brief` runs queued while both providers are down. The
 * worker parks them, carries every one on by itself once the providers recover, and what cannot
 * finish (a run whose topic has no words) is in `keel dlq ls` with its reason.
 */
import { existsSync, mkdirSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { afterEach, beforeEach, expect, it } from 'vitest';
import { openEngine } from '../adapters/index.ts';
import brief from '../workflows/brief.ts';
import { startFakeAnthropic, type FakeAnthropic } from './support/fake-anthropic.ts';
import { startFakeOpenAI, type FakeOpenAI } from './support/fake-openai.ts';
import { ROOT, keel, keelJson, tempDir } from './support/index.ts';

let claude: FakeAnthropic;
let gpt: FakeOpenAI;

beforeEach(async () => {
  [claude, gpt] = await Promise.all([startFakeAnthropic(), startFakeOpenAI()]);
});
afterEach(async () => {
  await Promise.all([claude.close(), gpt.close()]);
});

it('keel worker finishes 50 briefs queued during an outage of both providers, and dead-letters the one that cannot finish', async () => {
  const dir = tempDir('keel-brief-worker-');
  const docs = join(dir, 'docs');
  mkdirSync(docs);
  writeFileSync(
    join(docs, 'notes.md'),
    '# Resume\n\nAfter a crash keel resumes the run from its last checkpoint.\n',
  );
  const db = join(dir, 'k.db');
  const config = join(dir, 'keel.config.json');
  writeFileSync(
    config,
    JSON.stringify({ llm: { breaker: { failureThreshold: 3, cooldownMs: 500 } } }),
  );
  const engine = openEngine({ db, llm: () => Promise.reject(new Error('not used here')) });
  const module = join(ROOT, 'workflows/brief.ts');
  for (let i = 0; i < 50; i++) {
    await engine.enqueue(
      brief,
      { topic: 'resume after a crash', docs, outbox: join(dir, `out-${i}`) },
      { module },
    );
  }
  const hopeless = await engine.enqueue(
    brief,
    { topic: 'the of and', docs, outbox: join(dir, 'out-x') },
    { module },
  );
  await engine.close();

  // Both providers answer 503 for three seconds from the first request, then recover.
  let recovery: number | undefined;
  const down = () => Date.now() < (recovery ??= Date.now() + 3_000);
  let duringOutage = 0;
  claude.otherwise(() => {
    if (down()) {
      duringOutage += 1;
      return { status: 503 };
    }
    return { content: [{ type: 'text', text: 'keel resumes from its last checkpoint [1].' }] };
  });
  gpt.otherwise(() => {
    if (down()) {
      duringOutage += 1;
      return { status: 503, error: { message: 'down', type: 'server_error' } };
    }
    return { text: 'keel resumes from its last checkpoint [1].' };
  });

  const env = {
    ANTHROPIC_API_KEY: 'sk-ant-worker-test',
    ANTHROPIC_BASE_URL: claude.url,
    OPENAI_API_KEY: 'sk-openai-worker-test',
    OPENAI_BASE_URL: gpt.url,
    KEEL_LOCAL_BASE_URL: 'http://127.0.0.1:9/v1',
    KEEL_DEGRADED: 'off',
    KEEL_CONFIG: config,
  };
  const worker = await keel(
    ['worker', '--db', db, '--until-idle', '--concurrency', '8', '--poll', '200', '--json'],
    { env, cwd: dir, timeoutMs: 120_000 },
  );
  expect(worker.code, worker.stderr).toBe(0);
  const report = JSON.parse(worker.stdout) as { completed: number; failed: number };
  expect([report.completed, report.failed]).toEqual([50, 1]);
  expect(worker.stderr).toContain('run parked');
  expect(duringOutage).toBeGreaterThan(0);

  const runs = await keelJson<{ id: string; status: string }[]>(['ls', '--db', db]);
  expect(runs.filter((r) => r.status === 'completed')).toHaveLength(50);
  for (let i = 0; i < 50; i++) {
    expect(existsSync(join(dir, `out-${i}`, 'brief-resume-after-a-crash.md'))).toBe(true);
  }
  const letters = await keelJson<{ runId: string; step: string; reason: string }[]>([
    'dlq',
    'ls',
    '--db',
    db,
  ]);
  expect(letters.map((d) => [d.runId, d.step, d.reason])).toEqual([
    [hopeless.runId, 'search', 'not_retryable'],
  ]);
});
