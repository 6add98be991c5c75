/**
 * A process killed with SIGKILL in the middle of a step, after three completed LLM calls: the
 * resumed step gets those three answers from the journal, and the fake provider receives no
 * request twice.
 */
import { existsSync } from 'node:fs';
import { join } from 'node:path';
import { afterEach, beforeEach, expect, it } from 'vitest';
import { startFakeAnthropic, type FakeAnthropic } from './support/fake-anthropic.ts';
import { FIXTURES, keel, keelJson, tempDir } from './support/index.ts';

const KEY = 'sk-ant-crash-test-SECRET-777777';
let fake: FakeAnthropic;

beforeEach(async () => {
  fake = await startFakeAnthropic();
});
afterEach(() => fake.close());

const userTexts = () =>
  fake.requests.map((r) => (r.body as { messages: { content: string }[] }).messages[0]!.content);

it('three completed calls, SIGKILL mid-step, resume: each request reached the provider once', async () => {
  const dir = tempDir('keel-llm-crash-');
  const db = join(dir, 'k.db');
  const mark = join(dir, 'died');
  const env = {
    ANTHROPIC_API_KEY: KEY,
    ANTHROPIC_BASE_URL: fake.url,
    OPENAI_API_KEY: '',
    KEEL_LOCAL_BASE_URL: 'http://127.0.0.1:9/v1',
    KEEL_DEGRADED: 'off',
    KEEL_TEST_DIE_MARK: mark,
  };
  fake.script(['A', 'B', 'C', 'D'].map((text) => ({ content: [{ type: 'text' as const, text }] })));
  const run = await keel(['run', join(FIXTURES, 'llm-three-calls.ts'), '--db', db], {
    env,
    cwd: dir,
  });
  expect(run.signal).toBe('SIGKILL');
  expect(existsSync(mark)).toBe(true);
  expect(userTexts()).toEqual(['one', 'two', 'three']);

  const resumed = await keel(['resume', '--all', '--db', db], { env, cwd: dir });
  expect(resumed.code, resumed.stderr).toBe(0);
  expect(userTexts()).toEqual(['one', 'two', 'three', 'four']);

  const [summary] = await keelJson<{ id: string }[]>(['ls', '--db', db], { env, cwd: dir });
  const shown = await keelJson<{
    status: string;
    state: { answers: string[] };
    llmCalls: { position: number; tier: string; replayed: boolean }[];
  }>(['show', summary!.id, '--db', db], { env, cwd: dir });
  expect(shown.status).toBe('completed');
  expect(shown.state.answers).toEqual(['A', 'B', 'C', 'D']);
  expect(shown.llmCalls.map((c) => [c.position, c.tier, c.replayed])).toEqual([
    [0, 'anthropic', true],
    [1, 'anthropic', true],
    [2, 'anthropic', true],
    [3, 'anthropic', false],
  ]);
});
