/**
 * Errors are stored and read back in other processes: the serialize/deserialize pair must keep what
 * the engine and the CLI decide on (name, code, step, remaining effects, the chain of causes), and
 * the guards must recognise an error that came back from the database.
 */
import { describe, expect, it } from 'vitest';
import {
  CompensationError,
  StateError,
  deserializeError,
  isCompensationError,
  isKeelError,
  isStateError,
  serializeError,
  type SerializedError,
} from 'keel';

const throughTheDatabase = (error: unknown) =>
  deserializeError(JSON.parse(JSON.stringify(serializeError(error))) as SerializedError);

describe('errors that come back out of the database', () => {
  it('keep their name, code, step, fields and causes, and the guards still recognise them', () => {
    const root = new TypeError('socket hang up');
    const stored = new CompensationError('Rollback stopped at effect "C3".', {
      runId: 'r1',
      step: 'pay',
      remaining: ['C3', 'C2'],
      cause: new StateError('bad value', { path: 'state.a', cause: root }),
      hint: 'Fix the compensation.',
    });
    const back = throughTheDatabase(stored);
    expect(back).toBeInstanceOf(Error);
    expect(back).not.toBeInstanceOf(CompensationError);
    expect(isCompensationError(back)).toBe(true);
    expect(isKeelError(back)).toBe(true);
    expect(back).toMatchObject({
      name: 'CompensationError',
      code: 'COMPENSATION_FAILED',
      runId: 'r1',
      step: 'pay',
      remaining: ['C3', 'C2'],
      message: 'Rollback stopped at effect "C3".\n  Fix the compensation.',
    });
    const cause = back.cause as Error;
    expect(isStateError(cause)).toBe(true);
    expect(cause).toMatchObject({
      name: 'StateError',
      code: 'STATE_UNSERIALIZABLE',
      path: 'state.a',
    });
    expect(cause.cause).toMatchObject({ name: 'TypeError', message: 'socket hang up' });
  });

  it('are recognised as keel errors by their code, with or without a hint', () => {
    const back = throughTheDatabase(new StateError('no hint here'));
    expect(back).toMatchObject({ name: 'StateError', code: 'STATE_UNSERIALIZABLE' });
    expect(isKeelError(back)).toBe(true);
    expect(isKeelError(Object.assign(new Error('x'), { code: 'ENOENT' }))).toBe(false);
  });

  it('turn thrown non-errors into readable ones instead of "[object Object]"', () => {
    expect(throughTheDatabase({ status: 503 })).toMatchObject({
      name: 'NonError',
      message: '{"status":503}',
    });
    expect(throughTheDatabase('plain text')).toMatchObject({
      name: 'NonError',
      message: 'plain text',
    });
  });

  it('stop a cause chain that loops instead of recursing for ever', () => {
    const a = new Error('a');
    const b = new Error('b', { cause: a });
    (a as { cause?: unknown }).cause = b;
    let depth = 0;
    for (let e: SerializedError | undefined = serializeError(a); e; e = e.cause) depth++;
    expect(depth).toBe(9);
  });
});
