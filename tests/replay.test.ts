/**
 * Rebuilding a state from checkpoints read after a late writer: the rows from the newest snapshot a
 * resumer knew of may include a newer snapshot, which replaces the state rather than patching it.
 */
import { describe, expect, it } from 'vitest';
import { encode } from '../engine/codec.ts';
import { replay } from '../engine/state.ts';
import type { CheckpointRecord } from '../engine/store.ts';

const row = (seq: number, kind: CheckpointRecord['kind'], value: unknown): CheckpointRecord => ({
  runId: 'r',
  seq,
  kind,
  step: 's',
  data: encode(value),
  createdAt: 0,
});

describe('replay', () => {
  it('applies patches after a snapshot, and a later snapshot in the tail replaces the state', () => {
    const state = replay([
      row(1, 'snapshot', { n: 1, tags: ['a'] }),
      row(2, 'patch', [{ op: 'replace', path: ['n'], value: 2 }]),
      row(3, 'snapshot', { n: 10, tags: ['z'] }),
      row(4, 'patch', [{ op: 'add', path: ['tags', 1], value: 'y' }]),
    ]);
    expect(state).toEqual({ n: 10, tags: ['z', 'y'] });
  });

  it('refuses checkpoints that do not start with a snapshot, naming what to do', () => {
    expect(() => replay([row(2, 'patch', [])])).toThrow(
      'The run has no snapshot to resume from: its checkpoints are damaged.',
    );
  });
});
