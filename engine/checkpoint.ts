/**
 * What a milestone writes for the state: a patch in the common case, a full snapshot every so often.
 *
 * A snapshot is written when the patches since the last one number `snapshotEvery`, or weigh more
 * than the snapshot itself (at least 64 KiB), so that resuming reads one snapshot and a bounded tail
 * whatever the length of the run, and bytes per step follow the size of the change.
 */
import type { Patch } from 'immer';
import { encode } from './codec.ts';
import type { EngineDeps } from './deps.ts';
import { ErrorCode, StateError } from './errors.ts';
import { encodePatches } from './state.ts';
import type { CheckpointRecord, Milestone, RunRecord } from './store.ts';

const MIN_TAIL_BYTES = 64 * 1024;

export function stateMilestone(
  deps: EngineDeps,
  run: RunRecord,
  step: string,
  patches: readonly Patch[],
  next: object,
): Pick<Milestone, 'checkpoint' | 'run'> {
  if (patches.length === 0) return { run: {} };
  const seq = run.seq + 1;
  let data: string;
  try {
    data = encodePatches(patches, deps.secrets);
  } catch (error) {
    // A patch's path names a Map entry by its bare key, as if it were a field: encoding the whole
    // state names the path of the bad value exactly (`state.m.get("k").a`, not `state.m.k.a`).
    encode(next, { secrets: deps.secrets });
    throw error;
  }
  const tail = run.patchBytes + data.length;
  const needsSnapshot =
    run.patchCount + 1 >= deps.snapshotEvery ||
    tail > Math.max(run.snapshotBytes, MIN_TAIL_BYTES) ||
    run.snapshotBytes + tail > deps.maxStateBytes ||
    !replayable(patches, data);
  if (!needsSnapshot) {
    return {
      checkpoint: record(run.id, seq, 'patch', step, data, deps.clock.now()),
      run: { seq, patchBytes: tail, patchCount: run.patchCount + 1 },
    };
  }
  const full = snapshotData(deps, run.id, step, next);
  return {
    checkpoint: record(run.id, seq, 'snapshot', step, full, deps.clock.now()),
    run: { seq, snapshotSeq: seq, snapshotBytes: full.length, patchBytes: 0, patchCount: 0 },
  };
}

/**
 * Whether immer can apply these patches, once decoded, to the decoded state and get the state they
 * came from. It cannot when a patch names a Map entry by a key that is neither a string nor a number
 * (the decoded key is another object, and keys on the way are turned into strings), removes an
 * object from a Set (looked up by identity), passes a key named `constructor` (refused) or carries a
 * key named `__proto__` (copying it sets a prototype instead). Such a milestone writes a snapshot.
 */
function replayable(patches: readonly Patch[], data: string): boolean {
  if (data.includes('"__proto__"')) return false;
  return patches.every(
    (patch) =>
      !(patch.op === 'remove' && typeof patch.value === 'object' && patch.value !== null) &&
      patch.path.every(
        (key) => typeof key === 'number' || (typeof key === 'string' && key !== 'constructor'),
      ),
  );
}

/** Encodes a whole state, refusing one over the configured limit. */
export function snapshotData(deps: EngineDeps, runId: string, step: string | null, state: object) {
  const data = encode(state, { secrets: deps.secrets });
  if (data.length > deps.maxStateBytes) {
    const mb = (n: number) => `${(n / 1024 / 1024).toFixed(1)} MB`;
    throw new StateError(
      `The state of run ${runId}${step ? ` after step "${step}"` : ''} is ${mb(data.length)}, over the limit of ${mb(deps.maxStateBytes)}; nothing was written and the previous checkpoint is intact.`,
      {
        code: ErrorCode.stateTooLarge,
        runId,
        ...(step ? { step } : {}),
        hint: 'Keep large data (documents, embeddings, files) outside the state and store a reference, or raise the limit (openEngine({ maxStateBytes }) or KEEL_MAX_STATE_BYTES).',
      },
    );
  }
  return data;
}

function record(
  runId: string,
  seq: number,
  kind: CheckpointRecord['kind'],
  step: string,
  data: string,
  createdAt: number,
): CheckpointRecord {
  return { runId, seq, kind, step, data, createdAt };
}
