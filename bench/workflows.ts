/** The workflows the benchmark's child processes run. */
import { workflow } from '../adapters/index.ts';

export const RUN_ID = 'bench-resume';

/**
 * One step that routes back to itself: a run of `stop` steps whose definition is the same whatever
 * its length, so that resuming it measures the engine, not the size of the graph. The process doing
 * step number `at` (counted from 0) calls `atStep`: to die there, or to report.
 */
export function resumable(atStep: () => void) {
  return workflow<{ i: number; at: number; stop: number; note: string }>('bench-resume', {
    version: 1,
    maxSteps: 1_000_000,
  })
    .step('tick', (state) => {
      if (state.i === state.at) atStep();
      state.i += 1;
      state.note = `step ${state.i}`;
    })
    .route('tick', (state) => (state.i < state.stop ? 'tick' : 'done'), ['tick', 'done'])
    .step('done', () => {});
}

export const noop = workflow<{ n: number }>('bench-noop', { version: 1 }).step('only', (state) => {
  state.n += 1;
});
