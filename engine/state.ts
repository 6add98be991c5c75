/**
 * The state of a run in memory: the last committed value (`base`) and the immer draft a step mutates.
 *
 * Steps receive a stable root proxy that forwards to the current draft, so that `ctx.checkpoint()` can
 * finish one draft (collecting its patches) and start the next while the step keeps its `state`.
 */
import { Immer, enableMapSet, enablePatches, type Patch } from 'immer';
import { decode, encode, type DecodeOptions } from './codec.ts';
import { StateError } from './errors.ts';
import type { Keyring } from './secret.ts';
import type { CheckpointRecord } from './store.ts';

enablePatches();
enableMapSet();

/** Freezing every committed state would cost a walk of the whole state per step; keel never mutates it. */
const immer = new Immer({ autoFreeze: false });

export type Draftable = Record<string | symbol, unknown>;

export class StateTracker {
  private current: Draftable;
  private draft: Draftable | null = null;
  private readonly root: Draftable;
  /** Set when a checkpoint inside a step failed: the step must fail even if its code caught it. */
  poisoned: Error | null = null;

  constructor(base: object) {
    this.current = base as Draftable;
    this.root = new Proxy({}, this.forwarding());
  }

  /** The last committed state. Read it; never mutate it. */
  get base(): Draftable {
    return this.current;
  }

  /** Starts a draft of `base` and returns the proxy the step mutates. */
  begin(): Draftable {
    this.poisoned = null;
    this.draft = immer.createDraft(this.current);
    return this.root;
  }

  /**
   * Finishes the draft and returns its patches and the new state, without adopting it: the caller
   * calls {@link adopt} once the milestone is committed, or {@link restart} when it was refused.
   */
  finish(): { patches: Patch[]; next: Draftable } {
    const draft = this.draft;
    if (!draft) return { patches: [], next: this.current };
    this.draft = null;
    let patches: Patch[] = [];
    const next: Draftable = immer.finishDraft(draft, (p) => (patches = p));
    return { patches, next };
  }

  adopt(next: Draftable, continueDraft: boolean): void {
    this.current = next;
    if (continueDraft) this.draft = immer.createDraft(next);
  }

  /** Drops the draft's changes; with `continueDraft`, the step goes on from `base`. */
  restart(continueDraft: boolean): void {
    this.draft = continueDraft ? immer.createDraft(this.current) : null;
  }

  private forwarding(): ProxyHandler<Draftable> {
    const live = () => {
      if (!this.draft) {
        throw new StateError('The state was used after its step ended.', {
          hint: 'Keep the state inside the step; do not store it in a closure that outlives the step.',
        });
      }
      return this.draft;
    };
    return {
      get: (_t, key) => Reflect.get(live(), key),
      set: (_t, key, value) => Reflect.set(live(), key, value),
      has: (_t, key) => Reflect.has(live(), key),
      deleteProperty: (_t, key) => Reflect.deleteProperty(live(), key),
      ownKeys: () => Reflect.ownKeys(live()),
      getOwnPropertyDescriptor: (_t, key) => {
        const descriptor = Reflect.getOwnPropertyDescriptor(live(), key);
        return descriptor && { ...descriptor, configurable: true };
      },
      defineProperty: (_t, key, descriptor) => Reflect.defineProperty(live(), key, descriptor),
      getPrototypeOf: () => Reflect.getPrototypeOf(live()),
    };
  }
}

/**
 * Rebuilds a state from its newest snapshot and the patches after it, with its secrets decrypted by
 * `options.secrets` (or left redacted, for a read-only view).
 */
export function replay(
  checkpoints: readonly CheckpointRecord[],
  options: DecodeOptions = {},
): Draftable {
  const [snapshot, ...tail] = checkpoints;
  if (!snapshot || snapshot.kind !== 'snapshot') {
    throw new StateError('The run has no snapshot to resume from: its checkpoints are damaged.', {
      hint: 'Check the database with PRAGMA integrity_check; roll the run back or start it again.',
    });
  }
  let state = decode<Draftable>(snapshot.data, options);
  for (const checkpoint of tail) {
    state =
      checkpoint.kind === 'snapshot'
        ? decode<Draftable>(checkpoint.data, options)
        : immer.applyPatches(state, decode<Patch[]>(checkpoint.data, options));
  }
  return state;
}

/** Encodes patches, naming the state path of any value that cannot be stored. */
export function encodePatches(patches: readonly Patch[], secrets: Keyring): string {
  try {
    return encode(patches, { secrets });
  } catch (error) {
    for (const patch of patches)
      encode(patch.value, { secrets, path: [...patch.path] as (string | number)[] });
    throw error;
  }
}
