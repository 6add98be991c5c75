/**
 * The short profile of the crash torture (`npm run torture` runs the long one): real processes
 * killed with SIGKILL at random moments and at named crash points, races of resumers and workers
 * with a stalled owner, rollbacks interrupted, every run judged against a crash-free reference.
 * Then the judge itself: a repeated effect or prompt whose outcome is recorded must be caught.
 */
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { openEngine } from 'keel';
import { tempDir } from './support/index.ts';
import { torture } from './torture/harness.ts';
import { answerTo, startServices } from './torture/services.ts';
import { linear, type Mix } from './torture/workflows.ts';
import Database from 'better-sqlite3';

describe('crash torture', () => {
  it('80 kills: no duplicate, no lost run, no mismatched state, an intact database', async () => {
    const report = await torture({
      kills: 80,
      seed: 20261204,
      dir: tempDir('keel-torture-'),
      raceEvery: 20,
    });
    expect(report.failures).toEqual([]);
    expect({
      duplicates: report.duplicates,
      lost: report.lost,
      mismatched: report.mismatched,
      integrity: report.integrity,
    }).toEqual({ duplicates: 0, lost: 0, mismatched: 0, integrity: 'ok' });
    expect(report.kills).toBeGreaterThanOrEqual(80);
    expect(report.crashPointKills).toBeGreaterThan(0);
    expect(report.timedKills).toBeGreaterThan(0);
    expect(report.races).toBeGreaterThanOrEqual(1);
    expect(report.runs).toBeGreaterThanOrEqual(20);
    expect(report.effectsApplied).toBeGreaterThanOrEqual(report.runs);
  }, 400_000);
});

describe('the torture judge', () => {
  it('catches an effect run again, and a prompt sent again, after their outcome was recorded', async () => {
    const dir = tempDir('keel-judge-');
    const db = join(dir, 'keel.db');
    const first = await startServices();
    const input: Mix = {
      id: 'L0b0r0',
      n: 2,
      log: [],
      total: 0,
      squares: [],
      answers: [],
      receipts: [],
    };
    const previous = process.env.TORTURE_SINK;
    process.env.TORTURE_SINK = first.sinkUrl;
    const engine = openEngine({
      db,
      llm: {
        tiers: [{ name: 'fake', provider: 'openai-compatible', baseURL: first.llmUrl, model: 'm' }],
        degraded: false,
      },
    });
    try {
      const run = await engine.start(linear, input);
      expect(run.status).toBe('completed');
    } finally {
      await engine.close();
      await first.close();
      process.env.TORTURE_SINK = previous;
    }
    expect([...first.applied.keys()].sort()).toEqual([
      'notify:L0b0r0:0',
      'notify:L0b0r0:1',
      'publish:L0b0r0',
    ]);
    expect(first.violations).toEqual([]);

    // A second world that judges against that database: the run is recorded there, so any repeat
    // of its effects or prompts is what a broken engine would do.
    const reader = new Database(db, { readonly: true });
    const second = await startServices((id) => (id === 'L0b0r0' ? reader : undefined));
    try {
      const apply = (value: number) =>
        fetch(`${second.sinkUrl}/apply`, {
          method: 'POST',
          body: JSON.stringify({ id: 'L0b0r0', key: 'publish:L0b0r0', value }),
        });
      expect((await apply(1)).status).toBe(200);
      expect(second.violations).toEqual([]);
      expect((await apply(1)).status).toBe(200);
      const ask = () =>
        fetch(`${second.llmUrl}/chat/completions`, {
          method: 'POST',
          headers: { 'content-type': 'application/json' },
          body: JSON.stringify({
            model: 'm',
            messages: [{ role: 'user', content: 'L0b0r0|ask:0' }],
          }),
        });
      const answer = (await (await ask()).json()) as {
        choices: { message: { content: string } }[];
      };
      expect(answer.choices[0]?.message.content).toBe(answerTo('L0b0r0|ask:0'));
      await ask();
      expect(second.violations).toEqual([
        'effect publish:L0b0r0 was run again after its outcome was recorded (done)',
        'the prompt "L0b0r0|ask:0" was sent again after its answer was recorded',
      ]);
      expect(second.reruns).toBe(1);
    } finally {
      await second.close();
      reader.close();
    }
  });
});
