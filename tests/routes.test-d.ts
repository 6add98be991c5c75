/**
 * Compile-time checks of the workflow builder (vitest typecheck; this file is type-checked, never
 * run): route targets must be declared steps, routes start from declared steps, a target may be
 * declared later in the chain, and a step mutates an immer draft of the state.
 */
import type { Draft } from 'immer';
import { describe, expectTypeOf, it } from 'vitest';
import {
  END,
  workflow,
  type CompleteWorkflow,
  type Engine,
  type RunResult,
  type StepContext,
  type Workflow,
} from 'keel';

type Brief = { topic: string; sources: string[]; notes: string[]; draft?: string };

declare const engine: Engine;
const input: Brief = { topic: 'leases', sources: [], notes: [] };

describe('typed routes', () => {
  it('a route target declared later in the chain type-checks where the workflow is started', () => {
    const brief = workflow<Brief>('brief', { version: 1 })
      .step('search', () => {})
      .step('analyze', () => {}, { retry: { attempts: 3 } })
      .route('analyze', (s) => (s.notes.length ? 'write' : 'search'))
      .step('write', () => {})
      .effect('publish', {
        key: (s) => `publish:${s.topic}`,
        run: () => ({ path: 'outbox/brief.md' }),
      });
    expectTypeOf(brief).toEqualTypeOf<
      Workflow<Brief, 'search' | 'analyze' | 'write' | 'publish', never>
    >();
    expectTypeOf(engine.start(brief, input)).toEqualTypeOf<Promise<RunResult<Brief>>>();
  });

  it('END and declared targets, with or without a targets list, type-check', () => {
    const loop = workflow<{ n: number }>('loop', { version: 1 })
      .step('inc', (s) => {
        s.n += 1;
      })
      .route('inc', (s) => (s.n < 3 ? 'inc' : END), ['inc', END]);
    expectTypeOf(engine.start(loop, { n: 0 })).toEqualTypeOf<Promise<RunResult<{ n: number }>>>();
  });

  it('an undeclared route target does not type-check where the workflow is started', () => {
    const astray = workflow<Brief>('astray', { version: 1 })
      .step('search', () => {})
      .route('search', (s) => (s.notes.length ? 'wrte' : 'search'));
    // the builder carries the unresolved target along
    expectTypeOf(astray).toEqualTypeOf<Workflow<Brief, 'search', 'wrte'>>();
    // @ts-expect-error -- "wrte" is not a declared step
    void engine.start(astray, input);

    const listed = workflow<Brief>('listed', { version: 1 })
      .step('search', () => {})
      .route('search', () => END, [END, 'ghost']);
    // @ts-expect-error -- "ghost", named in the targets list, is not a declared step
    void engine.start(listed, input);
  });

  it('a target stays unresolved when only an unrelated step is declared after the route', () => {
    const still = workflow<Brief>('still', { version: 1 })
      .step('search', () => {})
      .route('search', () => 'write')
      .step('writer', () => {});
    expectTypeOf(still).toEqualTypeOf<Workflow<Brief, 'search' | 'writer', 'write'>>();
    // @ts-expect-error -- "write" was never declared ("writer" was)
    void engine.start(still, input);
  });

  it('a workflow module can check itself where it is defined with satisfies CompleteWorkflow', () => {
    const complete = workflow<Brief>('complete', { version: 1 })
      .step('search', () => {})
      .route('search', () => 'write')
      .step('write', () => {});
    expectTypeOf(complete).toExtend<CompleteWorkflow<Brief>>();
    void (complete satisfies CompleteWorkflow<Brief>);

    const pending = workflow<Brief>('pending', { version: 1 })
      .step('search', () => {})
      .route('search', () => 'write');
    expectTypeOf(pending).not.toExtend<CompleteWorkflow<Brief>>();
    // @ts-expect-error -- "write" is not declared
    void (pending satisfies CompleteWorkflow<Brief>);
  });

  it('a route from a step name that is not declared (yet) does not type-check', () => {
    workflow<Brief>('early', { version: 1 })
      .step('search', () => {})
      // @ts-expect-error -- "write" is not declared before the route
      .route('write', () => END);
  });

  it("a step's state is the immer Draft of the state type, its context is typed by the state, and a route reads it read-only", () => {
    type Tagged = { readonly tags: readonly string[]; seen: ReadonlyMap<string, number> };
    workflow<Tagged>('drafts', { version: 1 })
      .step('tag', (state, ctx) => {
        expectTypeOf(state).toEqualTypeOf<Draft<Tagged>>();
        expectTypeOf(state.tags).toEqualTypeOf<string[]>();
        expectTypeOf(state.seen).toEqualTypeOf<Map<string, number>>();
        expectTypeOf(ctx).toEqualTypeOf<StepContext<Tagged>>();
        state.tags.push('reviewed');
      })
      .route('tag', (state) => {
        expectTypeOf(state).toEqualTypeOf<Readonly<Tagged>>();
        return END;
      });
  });
});
