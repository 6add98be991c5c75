/**
 * Routes and retries: cycles, graph checks before a run starts, definition-time errors, a route that
 * returns an unknown name at run time, the per-run step limit, and which step failures are retried.
 */
import { join } from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { END, openEngine, workflow, type Engine, type RunView } from 'keel';
import { FIXTURES, keel, lines, tempDir, type KeelResult } from './support/index.ts';

const engines: Engine[] = [];

afterEach(async () => {
  for (const engine of engines.splice(0)) await engine.close();
});

function engineAt(): Engine {
  const engine = openEngine({ db: join(tempDir('keel-route-'), 'keel.db') });
  engines.push(engine);
  return engine;
}

function parse(result: KeelResult): RunView {
  try {
    return JSON.parse(result.stdout) as RunView;
  } catch {
    throw new Error(`no JSON (exit ${result.code}):\n${result.stdout}\n${result.stderr}`);
  }
}

const trail = (view: RunView) => view.steps.map((s) => [s.name, s.status, s.next] as const);

describe('routes', () => {
  it('a route cycle runs its loop as many times as its condition says, then ends the run', async () => {
    const engine = engineAt();
    const wf = workflow<{ n: number; seen: string[] }>('route-cycle', { version: 1 })
      .step('draft', (s) => {
        s.n += 1;
        s.seen.push(`draft ${s.n}`);
      })
      .route('draft', (s) => (s.n < 3 ? 'draft' : 'review'), ['draft', 'review'])
      .step('review', (s) => {
        s.seen.push('review');
      })
      .route('review', () => END, [END]);
    const result = await engine.start(wf, { n: 0, seen: [] });
    expect(result.status).toBe('completed');
    expect(result.state).toEqual({ n: 3, seen: ['draft 1', 'draft 2', 'draft 3', 'review'] });
    const view = await engine.get(result.id);
    expect(trail(view)).toEqual([
      ['draft', 'completed', 'draft'],
      ['draft', 'completed', 'draft'],
      ['draft', 'completed', 'review'],
      ['review', 'completed', null],
    ]);
    expect(view.stepCount).toBe(4);
  });

  it('an undeclared route target is refused by engine.start before any run is written', async () => {
    const engine = engineAt();
    const wf = workflow<{ n: number }>('route-ghost', { version: 1 })
      .step('a', () => {})
      .route('a', () => 'ghost', ['ghost']);
    // @ts-expect-error -- "ghost" is no step, so the workflow is not startable
    const started = engine.start(wf, { n: 1 });
    await expect(started).rejects.toMatchObject({
      name: 'DefinitionError',
      code: 'DEFINITION',
      message:
        'workflow "route-ghost": the route from "a" names "ghost", which is not a declared step.\n  Steps: "a", or END.',
    });
    expect(await engine.list()).toEqual([]);
  });

  it('a step that no route can reach is refused by engine.start, naming the step', async () => {
    const engine = engineAt();
    const wf = workflow<{ n: number }>('route-dead', { version: 1 })
      .step('plan', () => {})
      .step('orphan', () => {})
      .step('write', () => {})
      .route('plan', () => 'write', ['write']);
    await expect(engine.start(wf, { n: 1 })).rejects.toMatchObject({
      name: 'DefinitionError',
      message: expect.stringMatching(
        /^workflow "route-dead": "orphan" can never run: no step or route leads there\.\n/,
      ) as unknown,
    });
    expect(await engine.list()).toEqual([]);
  });

  it('a route from a step that is not declared is an error where the workflow is defined', () => {
    const base = workflow<{ n: number }>('route-from', { version: 1 }).step('a', () => {});
    expect(() =>
      // @ts-expect-error -- "later" is not (yet) a declared step
      base.route('later', () => END),
    ).toThrow('workflow "route-from": route from "later", which is not a declared step.');
  });

  it('a second route from the same step is an error where the workflow is defined', () => {
    const base = workflow<{ n: number }>('route-twice', { version: 1 })
      .step('a', () => {})
      .step('b', () => {})
      .route('a', () => 'b', ['b']);
    expect(() => base.route('a', () => END, [END])).toThrow(
      'workflow "route-twice": step "a" already has a route.',
    );
  });

  it('a route without declared targets that returns an unknown name fails the run, naming the value and the steps it may return', async () => {
    const engine = engineAt();
    const ran: string[] = [];
    const wf = workflow<{ go: string }>('route-astray', { version: 1 })
      .step('a', (s) => {
        ran.push('a');
        s.go = 'nowhere';
      })
      .step('b', () => void ran.push('b'))
      .route('a', (s) => s.go as 'b');
    const result = await engine.start(wf, { go: 'b' });
    expect(result.status).toBe('failed');
    expect(result.error).toMatchObject({ name: 'DefinitionError', code: 'DEFINITION', step: 'a' });
    expect(result.error?.message).toBe(
      'The route after step "a" returned "nowhere", which is not a declared step.\n  Return one of: a, b, END.',
    );
    expect(ran).toEqual(['a']);
    // the step's changes are not committed when its route fails
    expect(result.state).toEqual({ go: 'b' });
    const view = await engine.get(result.id);
    expect(view.steps.map((s) => [s.name, s.status, s.attempts])).toEqual([['a', 'failed', 1]]);
  });

  it('a route that returns a declared step outside its declared targets fails the run', async () => {
    const engine = engineAt();
    const wf = workflow<{ n: number }>('route-outside', { version: 1 })
      .step('a', () => {})
      .step('b', () => {})
      .step('c', () => {})
      .route('a', () => 'c' as 'b', ['b']);
    const result = await engine.start(wf, { n: 0 });
    expect(result.status).toBe('failed');
    expect(result.error?.message).toBe(
      'The route after step "a" returned "c", which is not among its declared targets.\n  Return one of: b, END.',
    );
  });
});

describe('step limit and retries (keel CLI)', () => {
  it('a route that loops for ever fails the run at its step limit with STEP_LIMIT', async () => {
    const db = join(tempDir('keel-route-'), 'keel.db');
    const result = await keel([
      '--db',
      db,
      'run',
      join(FIXTURES, 'route-loop.ts'),
      '--input',
      '{"laps":0}',
      '--json',
    ]);
    expect(result.code).toBe(1);
    const view = parse(result);
    expect(view.status).toBe('failed');
    expect(view.error).toMatchObject({ code: 'STEP_LIMIT', step: 'lap' });
    expect(view.error?.message.split('\n')[0]).toBe(
      `Run ${view.id} reached its limit of 20 step executions at step "lap".`,
    );
    expect(view.stepCount).toBe(20);
    expect(view.state).toEqual({ laps: 10 });
    expect(view.steps.filter((s) => s.status === 'completed')).toHaveLength(20);
  });

  it('a step that fails twice then passes, with retry attempts 3, completes and shows 3 attempts', async () => {
    const dir = tempDir('keel-route-');
    const result = await keel(
      [
        '--db',
        join(dir, 'keel.db'),
        'run',
        join(FIXTURES, 'route-retry.ts'),
        '--input',
        '{"done":false}',
        '--json',
      ],
      { env: { SINK_DIR: dir, ROUTE_MODE: 'flaky' } },
    );
    expect(result.code).toBe(0);
    const view = parse(result);
    expect(view.status).toBe('completed');
    expect(view.state).toEqual({ done: true });
    expect(view.steps.map((s) => [s.name, s.status, s.attempts])).toEqual([
      ['work', 'completed', 3],
      ['after', 'completed', 1],
    ]);
    expect(lines(join(dir, 'attempts.log'))).toEqual(['attempt 1', 'attempt 2', 'attempt 3']);
  });

  it('a state that cannot be serialized is not retried: the run fails on the first attempt', async () => {
    const dir = tempDir('keel-route-');
    const result = await keel(
      [
        '--db',
        join(dir, 'keel.db'),
        'run',
        join(FIXTURES, 'route-retry.ts'),
        '--input',
        '{"done":false}',
        '--json',
      ],
      { env: { SINK_DIR: dir, ROUTE_MODE: 'unserializable' } },
    );
    expect(result.code).toBe(1);
    const view = parse(result);
    expect(view.status).toBe('failed');
    expect(view.error).toMatchObject({
      name: 'StateError',
      code: 'STATE_UNSERIALIZABLE',
      step: 'work',
    });
    expect(view.error?.message.split('\n')[0]).toBe(
      'Cannot checkpoint state.handler: it holds a function.',
    );
    expect(view.steps.map((s) => [s.name, s.status, s.attempts])).toEqual([['work', 'failed', 1]]);
    expect(lines(join(dir, 'attempts.log'))).toEqual(['attempt 1']);
    expect(view.state).toEqual({ done: false });
  });
});
