/**
 * Hostile input, as properties: each runs with a fixed seed, so a failure replays exactly (fast-check
 * prints the seed and the shrunk counterexample). Everything goes through the real engine on real
 * SQLite files, and through the real `keel` command where the user would meet it.
 *
 * 1. States of random shape and size, set field by field and changed in place (patches, not only
 *    snapshots), read back exactly after the run, in a fresh engine, and after a resume.
 * 2. Values the state cannot hold, at a random path: refused, naming that path, the last checkpoint
 *    intact.
 * 3. Random graphs with random routes: valid ones visit exactly the expected steps; a route that
 *    returns something else, or throws, fails the run with an error naming the step and the value.
 * 4. A database damaged at random: `keel ls` and `keel show` work or refuse clearly, and never
 *    change a byte of it.
 * 5. A graph changed while a run waits: resuming is refused, the run left waiting as it was.
 * 6. A disk that fills during a checkpoint: a clear error, the last checkpoint intact, and a resume
 *    that finishes once there is room again.
 */
import { execFileSync } from 'node:child_process';
import { createHash } from 'node:crypto';
import {
  closeSync,
  copyFileSync,
  existsSync,
  mkdirSync,
  openSync,
  readFileSync,
  rmSync,
  statSync,
  truncateSync,
  writeFileSync,
  writeSync,
} from 'node:fs';
import { join } from 'node:path';
import fc from 'fast-check';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { END, openEngine, openSqliteStore, workflow, type Engine, type Workflow } from 'keel';
import { TOTAL_BLOCKS, block } from './fixtures/hostile-grow.ts';
import waiting from './fixtures/hostile-waiting.ts';
import { FIXTURES, keel, tempDir, type KeelResult } from './support/index.ts';

// ---------------------------------------------------------------------------------------------
// Values: what the state promises to keep, generated, copied and compared exactly.

const isRecord = (v: unknown): v is Record<string, unknown> => {
  if (typeof v !== 'object' || v === null) return false;
  const proto = Object.getPrototypeOf(v) as unknown;
  return proto === Object.prototype || proto === null;
};

/** Characters that break naive code: NUL, direction overrides, joiners, quotes, astral ones. */
const WELL_FORMED_ODD_CHARS = [
  '\u0000',
  '\u202E',
  '\u200D',
  '\uFEFF',
  '"',
  '\\',
  '\n',
  '$',
  '😀',
  'e\u0301',
];
/** And halves of surrogate pairs on their own, which UTF-8 cannot encode. */
const ODD_CHARS = [...WELL_FORMED_ODD_CHARS, '\uD800', '\uDBFF', '\uDC00', '\uDFFF'];

const oddString = fc.string({
  unit: fc.oneof(
    fc.constantFrom(...ODD_CHARS),
    fc.string({ unit: 'binary', minLength: 1, maxLength: 1 }),
  ),
  maxLength: 16,
});

/** Now and then a string long enough (up to 80,000 characters) to force a snapshot. */
const longString = fc
  .tuple(fc.integer({ min: 1_000, max: 80_000 }), oddString)
  .map(([length, edge]) => `${edge}${'long'.repeat(length / 4)}${edge}`);

/**
 * Object keys, among them the codec's tag and field names and a name immer guards. (Not `toString`:
 * an object whose `toString` is not a function trips the immer fault described at `setMember`.)
 */
const KEYS = ['$', 'v', '$$', 'constructor', 'hasOwnProperty', '', '0', '10', 'a b'];
const objectKey = fc.oneof(fc.constantFrom(...KEYS), oddString);

const shortLeaf = fc.oneof(
  oddString,
  // Strings that spell the codec's tags, so that `{ $: 'D', v: 5 }` lookalikes come up often.
  fc.constantFrom('D', 'M', 'S', 'U', 'N', 'B', 'O', 'P', 'E'),
  fc.double(),
  fc.constantFrom(NaN, -0, 0, Infinity, -Infinity, Number.MAX_VALUE, Number.MIN_VALUE),
  fc.integer(),
  fc.bigInt(),
  fc.boolean(),
  fc.constant(null),
  fc.constant(undefined),
  fc.date({ noInvalidDate: false }),
  fc.constant(null).map(() => new Date(NaN)),
);
const leaf = fc.oneof({ arbitrary: shortLeaf, weight: 30 }, { arbitrary: longString, weight: 1 });

/**
 * Map keys. Not `undefined`: immer 11.2 leaves a revoked draft in the state it finishes when a step
 * reads the value of a Map entry keyed by `undefined` and then changes that Map, so the step fails
 * whatever keel does.
 */
const primitiveKey = fc.oneof(oddString, fc.double(), fc.bigInt(), fc.boolean(), fc.constant(null));
const mapKey = fc.oneof(
  { arbitrary: primitiveKey, weight: 4 },
  fc.dictionary(objectKey, leaf, { maxKeys: 2 }),
  fc.date({ noInvalidDate: false }),
);

const { value } = fc.letrec((tie) => ({
  value: fc.oneof(
    { depthSize: 'small', maxDepth: 5 },
    leaf,
    tie('object'),
    tie('array'),
    tie('map'),
    tie('set'),
  ),
  // Some of these have no prototype: fast-check makes both kinds.
  object: fc.dictionary(objectKey, tie('value'), { maxKeys: 4 }),
  array: fc.array(tie('value'), { maxLength: 4 }),
  map: fc
    .array(fc.tuple(mapKey, tie('value')), { maxLength: 3 })
    .map((entries) => new Map(entries)),
  set: fc.array(tie('value'), { maxLength: 3 }).map((items) => new Set(items.map(setMember))),
}));

/**
 * immer 11.2 turns a Set's member into a property key (`String(member)`) when it finishes a draft
 * that read it, so a member that String() cannot convert (an object without a prototype, or an array
 * holding one) makes the step throw "Cannot convert object to primitive value", whatever keel does.
 * Members here are never arrays, and objects among them have the usual prototype.
 */
function setMember(item: unknown): unknown {
  if (Array.isArray(item)) return { items: item };
  return isRecord(item) ? { ...item } : item;
}

type Wrapper = 'object' | 'array' | 'map' | 'set' | 'bare';

/** A value nested 40 to 64 containers deep. */
const deep = fc
  .record({
    depth: fc.integer({ min: 40, max: 64 }),
    wrappers: fc.array(fc.constantFrom<Wrapper>('object', 'array', 'map', 'set', 'bare'), {
      minLength: 1,
      maxLength: 5,
    }),
    inner: value,
  })
  .map(({ depth, wrappers, inner }) => {
    let nested = inner;
    for (let i = 0; i < depth; i++) nested = wrap(wrappers[i % wrappers.length]!, nested, i);
    return nested;
  });

function wrap(wrapper: Wrapper, inner: unknown, i: number): unknown {
  switch (wrapper) {
    case 'object':
      return { [`d${i}`]: inner };
    case 'array':
      return [inner];
    case 'map':
      return new Map([[i, inner]]);
    case 'set':
      return new Set([setMember(inner)]);
    case 'bare':
      return Object.assign(Object.create(null) as object, { n: inner });
  }
}

/** A deep copy that keeps every kind the state promises to keep, prototypes included. */
function clone<T>(original: T): T {
  const v: unknown = original;
  if (typeof v !== 'object' || v === null) return original;
  if (v instanceof Date) return new Date(v.getTime()) as T;
  if (Array.isArray(v)) return v.map((item: unknown) => clone(item)) as T;
  if (v instanceof Map) return new Map([...v].map(([k, e]) => [clone(k), clone(e)])) as T;
  if (v instanceof Set) return new Set([...(v as Set<unknown>)].map((item) => clone(item))) as T;
  const copy = Object.create(Object.getPrototypeOf(v) as object | null) as Record<string, unknown>;
  for (const key of Object.keys(v)) copy[key] = clone((v as Record<string, unknown>)[key]);
  return copy as T;
}

function kindOf(v: unknown): string {
  if (v === null) return 'null';
  if (typeof v !== 'object') return typeof v;
  if (Array.isArray(v)) return 'array';
  if (v instanceof Date) return 'Date';
  if (v instanceof Map) return 'Map';
  if (v instanceof Set) return 'Set';
  if (Object.getPrototypeOf(v) === null) return 'object without prototype';
  if (Object.getPrototypeOf(v) === Object.prototype) return 'object';
  return `instance of ${v.constructor.name}`;
}

function show(v: unknown): string {
  if (typeof v === 'string') return JSON.stringify(v);
  if (typeof v === 'bigint') return `${v}n`;
  if (typeof v === 'object' && v !== null) return '';
  return Object.is(v, -0) ? '-0' : String(v);
}

/**
 * Where two values differ, or null when they are the same: -0 is not 0, NaN is NaN, a key holding
 * `undefined` is not a missing key, prototypes, key order and Map and Set order count.
 */
function difference(a: unknown, b: unknown, where = 'state'): string | null {
  const [ka, kb] = [kindOf(a), kindOf(b)];
  if (ka !== kb) return `${where}: ${ka} ${show(a)} vs ${kb} ${show(b)}`;
  if (typeof a !== 'object' || a === null) {
    return Object.is(a, b) ? null : `${where}: ${show(a)} vs ${show(b)}`;
  }
  if (a instanceof Date) {
    const [ta, tb] = [a.getTime(), (b as Date).getTime()];
    return Object.is(ta, tb) ? null : `${where}: Date ${ta} vs ${tb}`;
  }
  if (Array.isArray(a)) {
    const other = b as unknown[];
    if (a.length !== other.length) return `${where}: length ${a.length} vs ${other.length}`;
    for (let i = 0; i < a.length; i++) {
      if (i in a !== i in other) return `${where}[${i}]: a hole on one side only`;
      const found = difference(a[i], other[i], `${where}[${i}]`);
      if (found) return found;
    }
    return null;
  }
  if (a instanceof Set) return difference([...a], [...(b as Set<unknown>)], `${where} items`);
  if (a instanceof Map) {
    const [ea, eb] = [[...a], [...(b as Map<unknown, unknown>)]];
    if (ea.length !== eb.length) return `${where}: size ${ea.length} vs ${eb.length}`;
    for (let i = 0; i < ea.length; i++) {
      const found =
        difference(ea[i]![0], eb[i]![0], `${where} entry ${i} key`) ??
        difference(ea[i]![1], eb[i]![1], `${where} entry ${i} value`);
      if (found) return found;
    }
    return null;
  }
  const [keysA, keysB] = [Object.keys(a), Object.keys(b as object)];
  if (JSON.stringify(keysA) !== JSON.stringify(keysB)) {
    return `${where}: keys ${JSON.stringify(keysA)} vs ${JSON.stringify(keysB)}`;
  }
  for (const key of keysA) {
    const found = difference(
      (a as Record<string, unknown>)[key],
      (b as Record<string, unknown>)[key],
      `${where}[${JSON.stringify(key)}]`,
    );
    if (found) return found;
  }
  return null;
}

function expectSame(actual: unknown, expected: unknown, what: string): void {
  expect(difference(actual, expected), what).toBeNull();
}

/** Every container in a state, root first, depth first: objects, arrays, Maps (their values), Sets. */
function containers(root: unknown): object[] {
  const found: object[] = [];
  const visit = (v: unknown) => {
    if (typeof v !== 'object' || v === null || v instanceof Date) return;
    found.push(v);
    if (Array.isArray(v)) v.forEach(visit);
    else if (v instanceof Map) for (const entry of v.values()) visit(entry);
    else if (v instanceof Set) for (const item of v) visit(item);
    else for (const key of Object.keys(v)) visit((v as Record<string, unknown>)[key]);
  };
  visit(root);
  return found;
}

/**
 * A change in place: the container it picks, what it does there and with what. The same edit
 * applied to an immer draft and to a plain copy must give the same state.
 */
type Edit = { pick: number; op: number; at: number; key: string; mapKey: unknown; value: unknown };

const edit: fc.Arbitrary<Edit> = fc.record({
  pick: fc.nat(),
  op: fc.nat(),
  at: fc.nat(),
  key: objectKey,
  mapKey: primitiveKey,
  value,
});

function applyEdit(root: object, change: Edit): void {
  const all = containers(root);
  const target = all[change.pick % all.length]!;
  const item = clone(change.value);
  const op = change.op % 3;
  if (Array.isArray(target)) {
    if (op === 0 || target.length === 0) target.push(item);
    else if (op === 1) target[change.at % target.length] = item;
    else target.splice(change.at % target.length, 1);
  } else if (target instanceof Map) {
    const keys = [...target.keys()];
    if (op === 2 && keys.length > 0) target.delete(keys[change.at % keys.length]);
    else if (op === 1 && keys.length > 0) target.set(keys[change.at % keys.length], item);
    else target.set(clone(change.mapKey), item);
  } else if (target instanceof Set) {
    const items = [...target];
    if (op === 2 && items.length > 0) target.delete(items[change.at % items.length]);
    else target.add(setMember(item));
  } else {
    const record = target as Record<string, unknown>;
    const keys = Object.keys(record);
    if (op === 2 && keys.length > 0) delete record[keys[change.at % keys.length]!];
    else if (op === 1 && keys.length > 0) record[keys[change.at % keys.length]!] = item;
    else record[change.key] = item;
  }
}

// ---------------------------------------------------------------------------------------------
// 1. Random states through real runs.

type State = Record<string, unknown>;
type Action =
  | { kind: 'set'; key: string; value: unknown }
  | { kind: 'edit'; edit: Edit }
  | { kind: 'checkpoint' };

const action: fc.Arbitrary<Action> = fc.oneof(
  {
    weight: 2,
    arbitrary: fc.record({
      kind: fc.constant('set' as const),
      key: objectKey,
      value: fc.oneof({ weight: 4, arbitrary: value }, { weight: 1, arbitrary: deep }),
    }),
  },
  { weight: 3, arbitrary: fc.record({ kind: fc.constant('edit' as const), edit }) },
  { weight: 1, arbitrary: fc.constant({ kind: 'checkpoint' as const }) },
);

/** What a step does: its actions, in order, on the draft (or on the plain copy of the model). */
async function perform(
  state: State,
  actions: readonly Action[],
  checkpoint: () => Promise<void>,
): Promise<void> {
  for (const act of actions) {
    if (act.kind === 'set') state[act.key] = clone(act.value);
    else if (act.kind === 'edit') applyEdit(state, act.edit);
    else await checkpoint();
  }
}

/** The steps' actions, and step `interrupt.at` throwing at its end (while `interrupt.at` says so). */
function statesWorkflow(steps: readonly Action[][], interrupt: { at: number }) {
  let wf: Workflow<State, string> = workflow<State>('hostile-states', { version: 1 });
  steps.forEach((actions, i) => {
    wf = wf.step(`step-${i}`, async (state, ctx) => {
      await perform(state, actions, () => ctx.checkpoint());
      if (interrupt.at === i) throw new Error(`interrupted at step-${i}`);
    });
  });
  return wf;
}

/**
 * The states the runs must end with, computed on plain copies: the whole run; a run whose step
 * `at` failed at its end (its last `ctx.checkpoint()` kept, the rest dropped); and that run resumed,
 * which runs step `at` again from its start on the kept state.
 */
async function expectedStates(input: State, steps: readonly Action[][], at: number) {
  const whole = clone(input);
  for (const actions of steps) await perform(whole, actions, async () => {});
  let partial = clone(input);
  for (const actions of steps.slice(0, at)) await perform(partial, actions, async () => {});
  const draft = clone(partial);
  await perform(draft, steps[at]!, async () => {
    partial = clone(draft);
  });
  const resumed = clone(partial);
  for (const actions of steps.slice(at)) await perform(resumed, actions, async () => {});
  return { whole, partial, resumed };
}

describe('1. states of random shape and size read back exactly', () => {
  const dir = tempDir('keel-hostile-states-');

  it('after the run, in a fresh engine, and after a resume of a run interrupted midway', async () => {
    const scenario = fc.record({
      input: fc.dictionary(objectKey, value, { maxKeys: 3 }),
      steps: fc.array(fc.array(action, { minLength: 1, maxLength: 3 }), {
        minLength: 1,
        maxLength: 8,
      }),
      snapshotEvery: fc.integer({ min: 2, max: 50 }),
      interruptAt: fc.nat(),
    });
    let n = 0;
    await fc.assert(
      fc.asyncProperty(scenario, async ({ input, steps, snapshotEvery, interruptAt }) => {
        const db = join(dir, `states-${n++}.db`);
        const at = interruptAt % steps.length;
        const expected = await expectedStates(input, steps, at);
        const interrupt = { at: -1 };
        const wf = statesWorkflow(steps, interrupt);

        let engine = openEngine({ db, snapshotEvery });
        let whole: string;
        let interrupted: string;
        try {
          const run = await engine.start(wf, clone(input));
          expect(run.error).toBeNull();
          expect(run.status).toBe('completed');
          whole = run.id;
          expectSame(run.state, expected.whole, 'the state the run ended with');
          expectSame((await engine.get(whole)).state, expected.whole, 'the state read back');

          interrupt.at = at;
          const failed = await engine.start(wf, clone(input));
          interrupted = failed.id;
          expect(failed.status).toBe('failed');
          expect(failed.error?.message).toBe(`interrupted at step-${at}`);
          expectSame((await engine.get(interrupted)).state, expected.partial, 'the kept state');
        } finally {
          await engine.close();
        }

        engine = openEngine({ db, snapshotEvery });
        try {
          expectSame((await engine.get(whole)).state, expected.whole, 'in a fresh engine');
          expectSame((await engine.get(interrupted)).state, expected.partial, 'kept, reopened');
          interrupt.at = -1;
          const resumed = await engine.resume(interrupted, { workflow: wf });
          expect(resumed.error).toBeNull();
          expect(resumed.status).toBe('completed');
          expectSame(resumed.state, expected.resumed, 'the state the resumed run ended with');
        } finally {
          await engine.close();
        }

        engine = openEngine({ db });
        try {
          expectSame((await engine.get(interrupted)).state, expected.resumed, 'resumed, reopened');
        } finally {
          await engine.close();
        }
      }),
      // A run that hangs fails as a counterexample instead of holding the suite until its timeout.
      { seed: 0x4b45454c, numRuns: 80, timeout: 10_000 },
    );
  });
});

// ---------------------------------------------------------------------------------------------
// 2. What the state cannot hold, at a random path.

/** A class keel has no way to store: its instances carry behaviour, not data. */
class Handle {
  fd = 3;
  close(): void {}
}

type Unstorable = { name: string; make: () => unknown; holds: string; below?: string };

const UNSTORABLE: Unstorable[] = [
  { name: 'function', make: () => () => 'not data', holds: 'a function' },
  { name: 'async function', make: () => async () => 'not data', holds: 'a function' },
  { name: 'symbol', make: () => Symbol('not data'), holds: 'a symbol' },
  { name: 'class instance', make: () => new Handle(), holds: 'an instance of Handle' },
  { name: 'WeakMap', make: () => new WeakMap(), holds: 'an instance of WeakMap' },
  { name: 'WeakSet', make: () => new WeakSet(), holds: 'an instance of WeakSet' },
  { name: 'Uint8Array', make: () => new Uint8Array([1, 2]), holds: 'an instance of Uint8Array' },
  { name: 'Float64Array', make: () => new Float64Array(2), holds: 'an instance of Float64Array' },
  { name: 'Buffer', make: () => Buffer.from('data'), holds: 'an instance of Buffer' },
  { name: 'ArrayBuffer', make: () => new ArrayBuffer(4), holds: 'an instance of ArrayBuffer' },
  { name: 'RegExp', make: () => /data/g, holds: 'an instance of RegExp' },
  { name: 'Error', make: () => new Error('data'), holds: 'an instance of Error' },
  { name: 'Promise', make: () => Promise.resolve(1), holds: 'an instance of Promise' },
  { name: 'boxed number', make: () => Object(1) as object, holds: 'an instance of Number' },
  {
    name: 'cycle',
    make: () => {
      const loop: Record<string, unknown> = { name: 'loop' };
      loop.self = loop;
      return loop;
    },
    holds: 'a reference to one of its own ancestors (a cycle)',
    below: '.self',
  },
];

type Segment = { key: string } | { index: number } | { mapKey: unknown };

/** Every container with its path from the root, in the order `containers` lists them. */
function locate(root: unknown): { container: object; path: Segment[] }[] {
  const found: { container: object; path: Segment[] }[] = [];
  const visit = (v: unknown, path: Segment[]) => {
    if (typeof v !== 'object' || v === null || v instanceof Date) return;
    found.push({ container: v, path });
    if (Array.isArray(v)) v.forEach((item, index) => visit(item, [...path, { index }]));
    else if (v instanceof Map) for (const [mapKey, e] of v) visit(e, [...path, { mapKey }]);
    else if (v instanceof Set) [...v].forEach((item, index) => visit(item, [...path, { index }]));
    else {
      for (const key of Object.keys(v)) visit((v as State)[key], [...path, { key }]);
    }
  };
  visit(root, []);
  return found;
}

/** A path as keel's messages write it: `state.a["b c"][2].get("k").get(5n)`. */
function pathText(path: readonly Segment[]): string {
  let text = 'state';
  for (const segment of path) {
    if ('index' in segment) text += `[${segment.index}]`;
    else if ('key' in segment) {
      const { key } = segment;
      text += /^[A-Za-z_$][\w$]*$/.test(key) ? `.${key}` : `[${JSON.stringify(key)}]`;
    } else {
      const key = segment.mapKey;
      const shown =
        typeof key === 'string'
          ? JSON.stringify(key)
          : typeof key === 'bigint'
            ? `${key}n`
            : typeof key === 'object' && key !== null
              ? '{…}'
              : String(key);
      text += `.get(${shown})`;
    }
  }
  return text;
}

type Placement = {
  pick: number;
  op: number;
  at: number;
  key: string;
  mapKey: unknown;
  /** Containers the bad value is wrapped in: an object field or an array's first item. */
  wrappers: ({ key: string } | { index: 0 })[];
};

/** Puts `bad` somewhere in the state and returns the path keel must name. */
function place(root: State, bad: unknown, where: Placement): Segment[] {
  const all = locate(root);
  const { container, path } = all[where.pick % all.length]!;
  let wrapped = bad;
  for (const wrapper of [...where.wrappers].reverse()) {
    wrapped = 'key' in wrapper ? { [wrapper.key]: wrapped } : [wrapped];
  }
  let at: Segment;
  if (Array.isArray(container)) {
    const index =
      where.op % 2 === 0 || container.length === 0 ? container.length : where.at % container.length;
    container[index] = wrapped;
    at = { index };
  } else if (container instanceof Map) {
    const keys: unknown[] = [...container.keys()];
    const mapKey =
      where.op % 2 === 0 || keys.length === 0 ? where.mapKey : keys[where.at % keys.length];
    container.set(mapKey, wrapped);
    at = { mapKey };
  } else if (container instanceof Set) {
    at = { index: container.size };
    container.add(wrapped);
  } else {
    (container as State)[where.key] = wrapped;
    at = { key: where.key };
  }
  return [...path, at, ...where.wrappers];
}

describe('2. values the state cannot hold are refused, naming their exact path', () => {
  const dir = tempDir('keel-hostile-refuse-');
  let engine: Engine;
  beforeAll(() => {
    engine = openEngine({ db: join(dir, 'keel.db') });
  });
  afterAll(async () => {
    await engine.close();
  });

  it('at the end of a step or at ctx.checkpoint(): a StateError with the path, the last checkpoint intact', async () => {
    const placement: fc.Arbitrary<Placement> = fc.record({
      pick: fc.nat(),
      op: fc.nat(),
      at: fc.nat(),
      key: objectKey,
      mapKey: primitiveKey,
      wrappers: fc.array(
        fc.oneof(fc.record({ key: objectKey }), fc.constant({ index: 0 as const })),
        { maxLength: 2 },
      ),
    });
    const scenario = fc.record({
      fields: fc.uniqueArray(fc.tuple(objectKey, value), {
        selector: ([key]) => key,
        minLength: 1,
        maxLength: 4,
      }),
      unstorable: fc.constantFrom(...UNSTORABLE),
      placement,
      atCheckpoint: fc.boolean(),
    });
    await fc.assert(
      fc.asyncProperty(scenario, async ({ fields, unstorable, placement: where, atCheckpoint }) => {
        const prepared: State = {};
        for (const [key, field] of fields) prepared[key] = clone(field);
        const kept = clone(prepared);
        if (atCheckpoint) kept.touched = true;
        let named: Segment[] = [];
        const wf = workflow<State>('hostile-refusals', { version: 1 })
          .step('prepare', (state) => {
            for (const [key, field] of fields) state[key] = clone(field);
          })
          .step('bad', async (state, ctx) => {
            if (atCheckpoint) {
              state.touched = true;
              await ctx.checkpoint();
            }
            named = place(state, unstorable.make(), where);
            if (atCheckpoint) await ctx.checkpoint();
          })
          .step('after', (state) => {
            state.after = true;
          });

        const run = await engine.start(wf, {});
        const path = `${pathText(named)}${unstorable.below ?? ''}`;
        const message = `Cannot checkpoint ${path}: it holds ${unstorable.holds}.`;
        expect(run.status).toBe('failed');
        expect(run.error?.message.split('\n')[0]).toBe(message);
        expect(run.error).toMatchObject({
          name: 'StateError',
          code: 'STATE_UNSERIALIZABLE',
          path,
          step: 'bad',
        });
        const view = await engine.get(run.id);
        expectSame(view.state, kept, 'the last checkpoint');
        expect(view.steps.map((s) => [s.name, s.status])).toStrictEqual([
          ['prepare', 'completed'],
          ['bad', 'failed'],
        ]);
        expect(view.steps[1]?.error?.message.split('\n')[0]).toBe(message);
      }),
      { seed: 0x5ef05e, numRuns: 60 },
    );
  });
});

// ---------------------------------------------------------------------------------------------
// 3. Random graphs, random routes.

/**
 * Step names of odd but well-formed Unicode. Not lone surrogates: keel refuses such a name when it
 * is declared, since SQLite text would turn one into U+FFFD (see the regressions below). Not
 * `#`, which starts the names no step has.
 */
const stepName = fc
  .string({
    unit: fc.oneof(
      fc.constantFrom(...WELL_FORMED_ODD_CHARS),
      fc.string({ unit: 'binary', minLength: 1, maxLength: 1 }),
      fc.constantFrom('a', 'b', 'END', 'end', '__end__', ' ', '.', '"'),
    ),
    minLength: 1,
    maxLength: 10,
  })
  .filter((name) => name !== '__end__' && !name.includes('#'));

/** What a route returns at one visit: a step (by position), the end, or something it must not. */
type Outcome =
  | { kind: 'go'; to: number }
  | { kind: 'end' }
  | { kind: 'unknown'; name: string }
  | { kind: 'value'; value: unknown; shown: string }
  | { kind: 'throw'; thrown: unknown; shown: string };

const NOT_NAMES: { value: unknown; shown: string }[] = [
  { value: 5, shown: '5' },
  { value: -0, shown: '-0' },
  { value: NaN, shown: 'NaN' },
  { value: -Infinity, shown: '-Infinity' },
  { value: 5n, shown: '5n' },
  { value: Symbol('next'), shown: 'Symbol(next)' },
  { value: null, shown: 'null' },
  { value: undefined, shown: 'undefined' },
  { value: true, shown: 'true' },
  { value: ['a'], shown: 'an array' },
  { value: { step: 'a' }, shown: 'an object' },
  { value: () => 'a', shown: 'a function' },
];

const outcome: fc.Arbitrary<Outcome> = fc.oneof(
  { weight: 12, arbitrary: fc.record({ kind: fc.constant('go' as const), to: fc.nat() }) },
  { weight: 2, arbitrary: fc.constant({ kind: 'end' as const }) },
  {
    weight: 1,
    arbitrary: fc.record({
      kind: fc.constant('unknown' as const),
      name: stepName.map((name) => `#${name}`),
    }),
  },
  {
    weight: 1,
    arbitrary: fc.constantFrom(...NOT_NAMES).map((v) => ({ kind: 'value' as const, ...v })),
  },
  {
    weight: 1,
    arbitrary: fc.constantFrom<Outcome>(
      { kind: 'throw', thrown: new Error('no way on'), shown: 'Error: no way on' },
      { kind: 'throw', thrown: 'a thrown string', shown: 'a thrown string' },
      { kind: 'throw', thrown: 42, shown: '42' },
    ),
  },
);

type Graph = { names: string[]; routes: (Outcome[] | null)[] };

/**
 * Where a run of the graph goes, worked out without keel: each visit of a routed step takes the
 * next outcome of its list (the end once the list is used up); a step without a route goes on to
 * the next one declared.
 */
function expectedVisits(graph: Graph) {
  const { names, routes } = graph;
  const visits: { name: string; next: string | null }[] = [];
  const taken = names.map(() => 0);
  let at: number | null = 0;
  while (at !== null) {
    const name = names[at]!;
    const plan: Outcome[] | null | undefined = routes[at];
    let next: number | null;
    if (!plan) {
      next = at + 1 < names.length ? at + 1 : null;
    } else {
      const choice: Outcome = plan[taken[at]!++] ?? { kind: 'end' };
      if (choice.kind === 'go') next = choice.to % names.length;
      else if (choice.kind === 'end') next = null;
      else return { visits, failure: { name, choice } };
    }
    visits.push({ name, next: next === null ? null : names[next]! });
    at = next;
  }
  return { visits, failure: null };
}

function routedWorkflow(graph: Graph) {
  let wf: Workflow<{ trail: string[] }, string> = workflow<{ trail: string[] }>('hostile-routes', {
    version: 1,
  });
  for (const name of graph.names) {
    wf = wf.step(name, (state, ctx) => {
      state.trail.push(ctx.step);
    });
  }
  graph.names.forEach((name, i) => {
    const plan = graph.routes[i];
    if (!plan) return;
    wf = wf.route(name, (state) => {
      // This visit is the step's nth: its route takes the nth outcome.
      const choice = plan[state.trail.filter((n) => n === name).length - 1] ?? { kind: 'end' };
      switch (choice.kind) {
        case 'go':
          return graph.names[choice.to % graph.names.length]!;
        case 'end':
          return END;
        case 'unknown':
          return choice.name;
        case 'value':
          return choice.value as string;
        case 'throw':
          throw choice.thrown;
      }
    });
  });
  return wf;
}

function failureMessage(from: string, choice: Outcome): string {
  const start = `The route after step "${from}"`;
  switch (choice.kind) {
    case 'unknown':
      return `${start} returned ${JSON.stringify(choice.name)}, which is not a declared step.`;
    case 'value':
      return `${start} returned ${choice.shown}, which is not a declared step.`;
    case 'throw':
      return `${start} threw: ${choice.shown}`;
    default:
      throw new Error(`${choice.kind} is not a failure`);
  }
}

describe('3. random graphs with random routes', () => {
  const dir = tempDir('keel-hostile-routes-');
  let engine: Engine;
  beforeAll(() => {
    engine = openEngine({ db: join(dir, 'keel.db') });
  });
  afterAll(async () => {
    await engine.close();
  });

  it('a valid route visits exactly the expected steps; a bad one fails the run naming the step and the value', async () => {
    const graph: fc.Arbitrary<Graph> = fc
      .uniqueArray(stepName, { minLength: 1, maxLength: 6 })
      .chain((names) =>
        fc.record({
          names: fc.constant(names),
          routes: fc.array(fc.option(fc.array(outcome, { maxLength: 4 }), { freq: 3 }), {
            minLength: names.length,
            maxLength: names.length,
          }),
        }),
      );
    await fc.assert(
      fc.asyncProperty(graph, async (g) => {
        const { visits, failure } = expectedVisits(g);
        const run = await engine.start(routedWorkflow(g), { trail: [] });
        const view = await engine.get(run.id);
        expect(run.state).toStrictEqual({ trail: visits.map((v) => v.name) });
        expect(view.state).toStrictEqual(run.state);
        const done = view.steps.filter((s) => s.status === 'completed');
        expect(done.map((s) => [s.name, s.next])).toStrictEqual(
          visits.map((v) => [v.name, v.next]),
        );
        if (!failure) {
          expect(run.error).toBeNull();
          expect(run.status).toBe('completed');
          expect(view.steps).toHaveLength(visits.length);
          return;
        }
        // A step name may hold a line break: compare whole messages, the hint included.
        const hint = `Return one of: ${[...g.names, 'END'].join(', ')}.`;
        const message =
          failure.choice.kind === 'throw'
            ? failureMessage(failure.name, failure.choice)
            : `${failureMessage(failure.name, failure.choice)}\n  ${hint}`;
        expect(run.status).toBe('failed');
        expect(run.error).toMatchObject({
          name: 'DefinitionError',
          code: 'DEFINITION',
          step: failure.name,
          message,
        });
        expect(view.steps).toHaveLength(visits.length + 1);
        const last = view.steps.at(-1)!;
        expect([last.name, last.status, last.attempts]).toStrictEqual([failure.name, 'failed', 1]);
        expect(last.error).toMatchObject({ name: 'DefinitionError', step: failure.name, message });
      }),
      { seed: 0x20a7e5, numRuns: 80 },
    );
  });
});

// ---------------------------------------------------------------------------------------------
// 4. A database damaged at random.

const sha256 = (file: string) => createHash('sha256').update(readFileSync(file)).digest('hex');

type Damage =
  | { kind: 'truncate'; at: number }
  | { kind: 'zero bytes'; at: number; length: number }
  | { kind: 'zero pages'; page: number; count: number };

const damage: fc.Arbitrary<Damage> = fc.oneof(
  fc.record({ kind: fc.constant('truncate' as const), at: fc.nat() }),
  fc.record({
    kind: fc.constant('zero bytes' as const),
    at: fc.nat(),
    length: fc.integer({ min: 1, max: 600 }),
  }),
  fc.record({
    kind: fc.constant('zero pages' as const),
    page: fc.nat(),
    count: fc.integer({ min: 1, max: 3 }),
  }),
);

const PAGE_SIZE = 4096;

function harm(file: string, how: Damage): void {
  const size = statSync(file).size;
  if (how.kind === 'truncate') {
    truncateSync(file, how.at % size);
    return;
  }
  const [start, length] =
    how.kind === 'zero bytes'
      ? [how.at % size, how.length]
      : [(how.page % (size / PAGE_SIZE)) * PAGE_SIZE, how.count * PAGE_SIZE];
  const fd = openSync(file, 'r+');
  try {
    writeSync(fd, Buffer.alloc(Math.min(length, size - start)), 0, undefined, start);
  } finally {
    closeSync(fd);
  }
}

/** The beginnings of the messages that refuse a damaged database, each saying what is wrong. */
function refusal(file: string): RegExp {
  const escaped = file.replace(/[.*+?^${}()|[\]\\]/g, '\\$&');
  return new RegExp(
    [
      `${escaped} is damaged \\(.+\\); keel left it untouched\\.`,
      `${escaped} is not a SQLite database \\(or its header is damaged\\); keel left it untouched\\.`,
      `No keel database at ${escaped}\\.`,
      'A value stored in the database is damaged \\(it is not the JSON keel wrote: .+\\)\\.',
      'The run has no snapshot to resume from: its checkpoints are damaged\\.',
    ]
      .map((start) => `^${start}`)
      .join('|'),
  );
}

const STACK_FRAME = /^\s+at .+:\d+(:\d+)?\)?$/m;

/** Exit 0 with what `works` expects, or a one-line refusal that says what is wrong with the file. */
function expectWorkedOrRefused(result: KeelResult, file: string, works: (out: string) => void) {
  const context = `exit ${result.code}\nstdout:\n${result.stdout}\nstderr:\n${result.stderr}`;
  const output = result.stdout + result.stderr;
  expect(result.signal, context).toBeNull();
  expect(output, context).not.toMatch(STACK_FRAME);
  expect(output, context).not.toContain('undefined');
  if (result.code === 0) {
    expect(result.stderr, context).toBe('');
    works(result.stdout);
    return;
  }
  expect([1, 2], context).toContain(result.code);
  expect(result.stdout, context).toBe('');
  expect(result.stderr.startsWith('keel: '), context).toBe(true);
  expect(result.stderr.slice(6), context).toMatch(refusal(file));
}

describe('4. a damaged database: keel ls and keel show work or refuse clearly, and change no byte', () => {
  const dir = tempDir('keel-hostile-damage-');
  const healthy = join(dir, 'healthy.db');
  const ids: string[] = [];
  /** Each run's state as the undamaged database holds it. */
  const states = new Map<string, unknown>();

  beforeAll(async () => {
    const engine = openEngine({ db: healthy, snapshotEvery: 3 });
    try {
      const wf = workflow<{ n: number; notes: string[] }>('hostile-healthy', { version: 1 })
        .step('write', (state) => {
          for (let i = 0; i < 8; i++) state.notes.push(`${state.n}:${i}:`.padEnd(700, 'n'));
        })
        .step('grow', (state) => {
          for (let i = 0; i < 4; i++) state.notes.push(`more ${i}`.padEnd(500, 'm'));
        })
        .step('count', (state) => {
          state.n = state.notes.length;
        });
      for (let n = 0; n < 6; n++) {
        const run = await engine.start(wf, { n, notes: [] });
        ids.push(run.id);
        states.set(run.id, run.state);
      }
    } finally {
      await engine.close();
    }
    expect(existsSync(`${healthy}-wal`)).toBe(false);
    expect(statSync(healthy).size / PAGE_SIZE).toBeGreaterThan(30);
  });

  it('the undamaged database lists every run and shows each', async () => {
    const [ls, show] = await Promise.all([
      keel(['ls', '--db', healthy]),
      keel(['show', ids[0]!, '--db', healthy]),
    ]);
    expect(ls.code, ls.stderr).toBe(0);
    for (const id of ids) expect(ls.stdout).toContain(id);
    expect(show.code, show.stderr).toBe(0);
    expect(show.stdout).toContain(`run       ${ids[0]}\n`);
    expect(show.stdout).toContain('status    completed\n');
  });

  it('in the API: every run reads back as it was written, or the read is refused saying the file is damaged', async () => {
    let n = 0;
    await fc.assert(
      fc.asyncProperty(damage, async (how) => {
        const file = join(dir, `api-${n++}.db`);
        copyFileSync(healthy, file);
        harm(file, how);
        const before = sha256(file);
        /** Runs `work`; a refusal must be a DatabaseError that says what is wrong. */
        const attempt = async <T>(work: () => Promise<T>): Promise<T | undefined> => {
          try {
            return await work();
          } catch (error) {
            expect((error as Error).message).toMatch(refusal(file));
            expect(['DatabaseError', 'StateError']).toContain((error as Error).name);
            return undefined;
          }
        };
        if (statSync(file).size === 0) {
          // Nothing is left to damage: an empty file is where a new database goes.
          const fresh = openEngine({ db: file });
          expect(await fresh.list().finally(() => fresh.close())).toStrictEqual([]);
          return;
        }
        const engine = await attempt(async () => openEngine({ db: file }));
        if (engine) {
          try {
            await attempt(() => engine.list());
            for (const id of ids) {
              // A state that reads back is the state that was written, not a part of it.
              const view = await attempt(() => engine.get(id));
              if (view) expect(view.state).toStrictEqual(states.get(id));
            }
          } finally {
            await engine.close();
          }
        }
        expect(sha256(file)).toBe(before);
      }),
      { seed: 0xda3a9f, numRuns: 300 },
    );
  });

  /** A copy of the healthy database with `bytes` zeroed from `at`, and its checksum. */
  function zeroed(name: string, at: number, bytes: number) {
    const file = join(dir, name);
    copyFileSync(healthy, file);
    harm(file, { kind: 'zero bytes', at, length: bytes });
    return { file, before: sha256(file) };
  }

  it('a database whose last page was cut short is refused as damaged (SQLITE_IOERR_SHORT_READ was not translated)', async () => {
    const file = join(dir, 'cut.db');
    copyFileSync(healthy, file);
    truncateSync(file, statSync(healthy).size - PAGE_SIZE + 100);
    const before = sha256(file);
    const readAll = async () => {
      const engine = openEngine({ db: file });
      try {
        for (const id of ids) await engine.get(id);
      } finally {
        await engine.close();
      }
    };
    await expect(readAll()).rejects.toMatchObject({
      name: 'DatabaseError',
      message: expect.stringContaining(
        `${file} is damaged (SQLITE_IOERR_SHORT_READ); keel left it untouched.`,
      ) as unknown,
    });
    expect(sha256(file)).toBe(before);
  });

  it('a header whose format versions were zeroed is refused, not rewritten by the switch to WAL', async () => {
    const { file, before } = zeroed('versions.db', 18, 2);
    const ls = await keel(['ls', '--db', file]);
    expect(ls.code, ls.stdout).toBe(2);
    expect(ls.stderr).toContain(
      `keel: ${file} is not a SQLite database (or its header is damaged); keel left it untouched.`,
    );
    expect(sha256(file)).toBe(before);
  });

  it("a keel database whose application id was zeroed is called damaged, not another application's", async () => {
    const { file, before } = zeroed('application-id.db', 68, 4);
    await expect(async () => openEngine({ db: file })).rejects.toMatchObject({
      name: 'DatabaseError',
      message: expect.stringContaining(
        `${file} is damaged (it has keel's tables, but its header lost keel's application id); keel left it untouched.`,
      ) as unknown,
    });
    expect(sha256(file)).toBe(before);
  });

  it('truncated, or with bytes or pages zeroed at random', async () => {
    let n = 0;
    await fc.assert(
      fc.asyncProperty(damage, fc.nat(), async (how, which) => {
        const file = join(dir, `damaged-${n++}.db`);
        copyFileSync(healthy, file);
        harm(file, how);
        const before = sha256(file);
        const id = ids[which % ids.length]!;
        const [ls, show] = await Promise.all([
          keel(['ls', '--db', file]),
          keel(['show', id, '--db', file]),
        ]);
        expectWorkedOrRefused(ls, file, (out) => {
          const listed = out.split('\n').slice(1).filter(Boolean);
          for (const line of listed) expect(ids).toContain(line.split(' ')[0]);
        });
        expectWorkedOrRefused(show, file, (out) => {
          expect(out.startsWith(`run       ${id}\n`), out).toBe(true);
        });
        expect(sha256(file)).toBe(before);
      }),
      { seed: 0xda3a9e, numRuns: 6 },
    );
  });
});

// ---------------------------------------------------------------------------------------------
// 5. A graph changed while a run waits.

type WaitKind = 'sleep' | 'signal';
type Waiter = { got?: unknown; after?: boolean };

const WAITING = join(FIXTURES, 'hostile-waiting.ts');

/**
 * `before → wait → after` as the run started, and the definitions deployed while it waits, with
 * the change each must be refused for.
 */
const GRAPHS = {
  same: { names: ['before', 'wait', 'after'], change: '' },
  added: { names: ['before', 'wait', 'after', 'extra'], change: 'step "extra" added' },
  removed: { names: ['before', 'wait'], change: 'step "after" removed' },
  renamed: {
    names: ['before', 'wait', 'finish'],
    change: 'step "finish" added; step "after" removed',
  },
  reordered: {
    names: ['wait', 'before', 'after'],
    change: 'order changed from before → wait → after to wait → before → after',
  },
  'made an effect': {
    names: ['before', 'wait', 'after:effect'],
    change: '"after" changed from step to effect',
  },
  routed: { names: ['before', 'wait', 'after', 'route'], change: 'route from "before" added' },
};

function waitingGraph(kind: WaitKind, graph: keyof typeof GRAPHS) {
  let wf: Workflow<Waiter, string> = workflow<Waiter>('hostile-wait-change', { version: 1 });
  for (const name of GRAPHS[graph].names) {
    if (name === 'wait') {
      wf = wf.step('wait', async (state, ctx) => {
        if (kind === 'sleep') await ctx.sleep('nap', '1h');
        else state.got = await ctx.waitFor('go');
      });
    } else if (name === 'after:effect') {
      wf = wf.effect('after', { key: () => 'after', run: () => true });
    } else if (name === 'route') {
      wf = wf.route('before', () => 'wait', ['wait']);
    } else {
      wf = wf.step(name, (state) => {
        if (name === 'after') state.after = true;
      });
    }
  }
  return wf;
}

const changedMessage = (workflowName: string, id: string, change: string) =>
  `Workflow "${workflowName}" changed since run ${id} started (version 1): ${change}.\n  Restore the definition the run started with, or raise the version to 2 and resume with --allow-version-change.`;

describe('5. a graph changed while a run waits', () => {
  const dir = tempDir('keel-hostile-waiting-');
  const opened: { close(): Promise<void> }[] = [];
  afterAll(async () => {
    for (const handle of opened.reverse()) await handle.close();
  });

  const cases = (['sleep', 'signal'] as const).flatMap((kind) =>
    (Object.keys(GRAPHS) as (keyof typeof GRAPHS)[])
      .filter((graph) => graph !== 'same')
      .map((graph) => ({ kind, graph })),
  );

  it.each(cases)(
    'waiting on a $kind, the graph $graph: resume is refused naming the change, the run left waiting as it was',
    async ({ kind, graph }) => {
      const db = join(dir, `${kind}-${graph}.db`);
      const engine = openEngine({ db });
      const store = openSqliteStore(db);
      opened.push(engine, store);
      const original = waitingGraph(kind, 'same');
      const changed = waitingGraph(kind, graph);
      const wait = kind === 'sleep' ? 'nap' : 'go';

      const run = await engine.start(original, {});
      expect(run.status).toBe('waiting');
      const before = await engine.get(run.id);
      const waitBefore = await store.getWait(run.id, wait);
      const queueBefore = await store.getQueueEntry(run.id);
      expect(before).toMatchObject({ status: 'waiting', cursor: 'wait' });
      expect(waitBefore).toMatchObject({ status: 'waiting', step: 'wait' });
      expect(queueBefore).toMatchObject({ reason: kind });

      const refusal = {
        code: 'VERSION_MISMATCH',
        message: changedMessage('hostile-wait-change', run.id, GRAPHS[graph].change),
      };
      await expect(engine.resume(run.id, { workflow: changed })).rejects.toMatchObject(refusal);
      if (kind === 'signal') {
        expect(await engine.signal(run.id, 'go', { approved: 1n })).toStrictEqual({ woke: true });
        await expect(engine.resume(run.id, { workflow: changed })).rejects.toMatchObject(refusal);
      }

      expect(await engine.get(run.id)).toStrictEqual(before);
      expect(await store.getWait(run.id, wait)).toStrictEqual(waitBefore);
      if (kind === 'sleep') {
        expect(await store.getQueueEntry(run.id)).toStrictEqual(queueBefore);
        // The definition it started with is taken: the sleep is not over, so it waits again,
        // until the same due time.
        const again = await engine.resume(run.id, { workflow: original });
        expect(again.status).toBe('waiting');
        expect(await store.getWait(run.id, wait)).toStrictEqual(waitBefore);
        expect((await store.getQueueEntry(run.id))?.dueAt).toBe(waitBefore!.dueAt);
      } else {
        // The signal woke the entry and is kept, not taken, for a definition that can run it.
        expect(await store.getQueueEntry(run.id)).toMatchObject({
          ...queueBefore,
          dueAt: expect.any(Number) as unknown,
        });
        expect(await store.nextSignal(run.id, 'go')).toMatchObject({ consumedAt: null });
        const done = await engine.resume(run.id, { workflow: original });
        expect(done.status).toBe('completed');
        expect(done.state).toStrictEqual({ got: { approved: 1n }, after: true });
      }
    },
  );

  it('through the keel command: resume refused before and after `keel signal`, the signal kept for the original definition', async () => {
    const db = join(dir, 'cli.db');
    const started = await keel(['run', WAITING, '--db', db, '--no-progress']);
    expect(started.code, started.stderr).toBe(1);
    const id = /^run (\S+) \(hostile-waiting\): waiting$/m.exec(started.stdout)?.[1];
    expect(id, started.stdout).toBeDefined();
    const engine = openEngine({ db });
    opened.push(engine);
    const before = await engine.get(id!);

    const changed = { env: { HOSTILE_GRAPH: 'added' } };
    const message = changedMessage('hostile-waiting', id!, 'step "extra" added');
    const refused = await keel(['resume', id!, '--db', db, '--no-progress'], changed);
    expect(refused.code, refused.stderr).toBe(1);
    expect(refused.stderr).toBe(`keel: ${message}\n`);
    const signal = await keel(['signal', id!, 'go', '--payload', '{"ok":true}', '--db', db]);
    expect(signal.code, signal.stderr).toBe(0);
    expect(signal.stdout).toBe(`signal go sent; run ${id} was waiting for it and is due now\n`);
    const again = await keel(['resume', id!, '--db', db, '--no-progress'], changed);
    expect(again.code, again.stderr).toBe(1);
    expect(again.stderr).toBe(`keel: ${message}\n`);

    expect(await engine.get(id!)).toStrictEqual(before);
    const done = await engine.resume(id!, { workflow: waiting });
    expect(done.status).toBe('completed');
    expect(done.state).toStrictEqual({ got: { ok: true }, after: true });
  });
});

// ---------------------------------------------------------------------------------------------
// 6. The disk fills during a checkpoint.

const GROW = join(FIXTURES, 'hostile-grow.ts');

describe('6. the disk fills during a checkpoint', () => {
  const dir = tempDir('keel-hostile-full-');
  /** An 8 MiB tmpfs of its own, so that filling it troubles nothing else. */
  const disk = join(dir, 'disk');
  let mounted = false;
  let unavailable = '';

  beforeAll(() => {
    mkdirSync(disk);
    try {
      execFileSync('mount', ['-t', 'tmpfs', '-o', 'size=8m', 'tmpfs', disk], { stdio: 'pipe' });
      mounted = true;
    } catch (error) {
      const stderr = (error as { stderr?: Buffer }).stderr?.toString().trim();
      unavailable = `cannot mount a small tmpfs to fill here: ${stderr || String(error)}`;
    }
  });
  // Registered after tempDir's clean-up, so it runs before it: the folder is unmounted first.
  afterAll(() => {
    if (mounted) execFileSync('umount', [disk]);
    mounted = false;
  });

  it('the run stops with an error that says the disk is full; the last checkpoint reads back; resume finishes once there is room', async (ctx) => {
    if (!mounted) ctx.skip(unavailable);
    const db = join(disk, 'keel.db');
    const ballast = join(disk, 'ballast');
    // Leaves 400 KiB: room for the database and a few steps, not for 24 blocks of 16 KiB.
    writeFileSync(ballast, Buffer.alloc(8 * 1024 * 1024 - 400 * 1024));

    const run = await keel(['run', GROW, '--input', '{"blocks":[]}', '--db', db, '--no-progress']);
    const context = `exit ${run.code}\nstdout:\n${run.stdout}\nstderr:\n${run.stderr}`;
    expect(run.code, context).not.toBe(0);
    expect(run.signal, context).toBeNull();
    expect(run.stdout + run.stderr, context).toContain(
      `The disk holding ${db} is full; the last commit was not written.\n  Free some space, then resume the run: its last good checkpoint is intact.`,
    );
    expect(run.stdout + run.stderr, context).not.toMatch(STACK_FRAME);

    rmSync(ballast);
    const engine = openEngine({ db });
    let id: string;
    try {
      const runs = await engine.list();
      expect(runs).toHaveLength(1);
      id = runs[0]!.id;
      const view = await engine.get(id);
      const kept = view.steps.filter((s) => s.status === 'completed').length;
      expect(kept, 'steps completed before the disk filled').toBeGreaterThan(0);
      expect(kept).toBeLessThan(TOTAL_BLOCKS);
      expect(view.state).toStrictEqual({
        blocks: Array.from({ length: kept }, (_, i) => block(i)),
      });
    } finally {
      await engine.close();
    }

    const resumed = await keel(['resume', id, '--db', db, '--no-progress']);
    expect(resumed.code, resumed.stdout + resumed.stderr).toBe(0);
    const reopened = openEngine({ db });
    try {
      const view = await reopened.get(id);
      expect(view.status).toBe('completed');
      expect(view.state).toStrictEqual({
        blocks: Array.from({ length: TOTAL_BLOCKS }, (_, i) => block(i)),
      });
    } finally {
      await reopened.close();
    }
  });
});

// ---------------------------------------------------------------------------------------------
// Faults the properties found, each pinned by the smallest case that shows it.

describe('regressions found by the properties above', () => {
  const dir = tempDir('keel-hostile-regress-');
  let n = 0;

  it('a step name holding half of a surrogate pair is refused when declared, not stored as another name', () => {
    const lone = 'draft\uD800';
    expect(() => workflow<State>('lone', { version: 1 }).step(lone, () => {})).toThrow(
      'workflow "lone": invalid step name "draft\\ud800": it holds half of a surrogate pair.',
    );
    expect(() => workflow<State>('lone', { version: 1 }).step('\uDC00x', () => {})).toThrow(
      'it holds half of a surrogate pair',
    );
    // A whole pair is a character like any other.
    const pair = workflow<State>('pair', { version: 1 }).step('draft\uD83D\uDE00', () => {});
    expect(pair.node('draft\uD83D\uDE00')?.name).toBe('draft\uD83D\uDE00');
  });

  /** Runs `wf` to the end, then reads its state back in a fresh engine (from the checkpoints). */
  async function runAndReload(wf: Workflow<State, string>, input: State = {}) {
    const db = join(dir, `regress-${n++}.db`);
    const engine = openEngine({ db });
    const run = await engine.start(wf, input).finally(() => engine.close());
    expect(run.error).toBeNull();
    const fresh = openEngine({ db });
    try {
      return { live: run.state, stored: (await fresh.get(run.id)).state };
    } finally {
      await fresh.close();
    }
  }

  const steps = (...fns: ((state: State) => void)[]) => {
    let wf: Workflow<State, string> = workflow<State>('hostile-regression', { version: 1 });
    fns.forEach((fn, i) => (wf = wf.step(`s${i}`, fn)));
    return wf;
  };

  it('a Map keyed by an object keeps a change made in place to the value of an entry', async () => {
    const { live, stored } = await runAndReload(
      steps(
        (s) => {
          s.m = new Map([[{ id: 1 }, { n: 1 }]]);
        },
        (s) => {
          for (const entry of (s.m as Map<object, { n: number }>).values()) entry.n = 2;
        },
        (s) => {
          for (const key of (s.m as Map<object, unknown>).keys())
            (s.m as Map<object, unknown>).set(key, 'replaced');
        },
      ),
    );
    expectSame(stored, { m: new Map([[{ id: 1 }, 'replaced']]) }, 'read back');
    expectSame(live, stored, 'as the run ended');
  });

  it('a Map keyed by a BigInt, a boolean or null keeps a change made in place to an entry', async () => {
    const keys = [5n, true, null];
    const { stored } = await runAndReload(
      steps(
        (s) => {
          s.m = new Map(keys.map((key) => [key, { n: 1 }]));
        },
        (s) => {
          for (const key of keys) (s.m as Map<unknown, { n: number }>).get(key)!.n = 2;
        },
      ),
    );
    expectSame(stored, { m: new Map(keys.map((key) => [key, { n: 2 }])) }, 'read back');
  });

  it('an object changed in place inside a Set reads back once, changed; one removed stays removed', async () => {
    const { stored } = await runAndReload(
      steps(
        (s) => {
          s.set = new Set([{ n: 1 }, { gone: true }, 'kept']);
        },
        (s) => {
          for (const item of s.set as Set<Record<string, unknown>>) {
            if (item.n === 1) item.n = 2;
            if (item.gone) (s.set as Set<unknown>).delete(item);
          }
        },
      ),
    );
    expectSame(stored, { set: new Set([{ n: 2 }, 'kept']) }, 'read back');
  });

  it('a field named "constructor" can be changed in place', async () => {
    const { stored } = await runAndReload(
      steps(
        (s) => {
          s.words = { constructor: { count: 1 } };
        },
        (s) => {
          (s.words as { constructor: { count: number } }).constructor.count += 1;
        },
      ),
    );
    expectSame(stored, { words: { constructor: { count: 2 } } }, 'read back');
  });

  it('an object without a prototype reads back without one, in the input and in the state', async () => {
    const bare = (fields: object) => Object.assign(Object.create(null) as object, fields);
    const { live, stored } = await runAndReload(
      steps(
        (s) => {
          s.dict = bare({ toString: 'a word', $: 'D' });
        },
        (s) => {
          Object.assign(s.dict as object, { constructor: 'another word' });
        },
      ),
      { input: bare({ n: 1 }) },
    );
    const expected = {
      input: bare({ n: 1 }),
      dict: bare({ toString: 'a word', $: 'D', constructor: 'another word' }),
    };
    expectSame(stored, expected, 'read back');
    expectSame(live, expected, 'as the run ended');
  });

  it('a key named "__proto__" (JSON.parse makes them) is kept as data, in the input and in the state', async () => {
    const parsed = () => JSON.parse('{"__proto__": {"polluted": true}, "n": 1}') as State;
    const { stored } = await runAndReload(
      steps(
        (s) => {
          s.later = parsed();
        },
        (s) => {
          (s.later as State).n = 2;
        },
      ),
      parsed(),
    );
    const later = parsed();
    later.n = 2;
    const expected = { ...parsed(), later };
    expect(Object.keys(stored as object)).toStrictEqual(['__proto__', 'n', 'later']);
    expectSame(stored, expected, 'read back');
    expect(({} as { polluted?: boolean }).polluted).toBeUndefined();
  });

  it.each([
    ['a string', 'two words', 'state.m.get("two words").bad'],
    ['a BigInt', 5n, 'state.m.get(5n).bad'],
    ['null', null, 'state.m.get(null).bad'],
    ['an object', { id: 1 }, 'state.m.get({…}).bad'],
  ])(
    'a refusal inside a Map keyed by %s names the entry as .get(key)',
    async (_what, key, path) => {
      const engine = openEngine({ db: join(dir, `refuse-${n++}.db`) });
      try {
        const run = await engine.start(
          steps(
            (s) => {
              s.m = new Map([[key, { ok: 1 }]]);
            },
            (s) => {
              for (const entry of (s.m as Map<unknown, State>).values())
                entry.bad = () => 'not data';
            },
          ),
          {},
        );
        expect(run.error).toMatchObject({ name: 'StateError', path, step: 's1' });
        expect(run.error?.message.split('\n')[0]).toBe(
          `Cannot checkpoint ${path}: it holds a function.`,
        );
      } finally {
        await engine.close();
      }
    },
  );

  it('a route that returns a BigInt fails at once with a DefinitionError naming it, the step not run again', async () => {
    const engine = openEngine({ db: join(dir, `route-${n++}.db`) });
    let ran = 0;
    try {
      const wf = workflow<State>('hostile-bigint-route', { version: 1 })
        .step(
          'pick',
          () => {
            ran += 1;
          },
          { retry: { attempts: 3, backoff: '1ms' } },
        )
        .step('next', () => {})
        .route('pick', () => 7n as unknown as 'next');
      const run = await engine.start(wf, {});
      expect(run.error).toMatchObject({
        name: 'DefinitionError',
        step: 'pick',
        message:
          'The route after step "pick" returned 7n, which is not a declared step.\n  Return one of: pick, next, END.',
      });
      expect(ran).toBe(1);
    } finally {
      await engine.close();
    }
  });

  it('a zeroed byte inside a stored state: reading the run says the database is damaged, not a JSON error', async () => {
    const db = join(dir, `zeroed-${n++}.db`);
    const engine = openEngine({ db });
    const run = await engine
      .start(
        steps((s) => void (s.note = 'a marker to find in the file')),
        {},
      )
      .finally(() => engine.close());
    const bytes = readFileSync(db);
    const at = bytes.indexOf('a marker to find');
    expect(at, 'the marker is in the file').toBeGreaterThan(0);
    bytes[at + 2] = 0;
    writeFileSync(db, bytes);
    const before = sha256(db);

    const damaged = openEngine({ db });
    await expect(damaged.get(run.id).finally(() => damaged.close())).rejects.toMatchObject({
      name: 'DatabaseError',
      code: 'DATABASE',
      message: expect.stringMatching(
        /^A value stored in the database is damaged \(it is not the JSON keel wrote: Bad control character .+\)\.\n {2}The file was changed outside keel/,
      ) as unknown,
    });
    const show = await keel(['show', run.id, '--db', db]);
    expect(show.code, show.stderr).toBe(2);
    expect(show.stderr).toMatch(
      /^keel: A value stored in the database is damaged \(it is not the JSON keel wrote: /,
    );
    expect(show.stderr).not.toMatch(STACK_FRAME);
    expect(sha256(db)).toBe(before);
  });
  it("a zeroed byte inside a failed run's stored error (and its graph): reading the run says the database is damaged, not a JSON error", async () => {
    const db = join(dir, `zeroed-error-${n++}.db`);
    const engine = openEngine({ db });
    const fails = workflow<State>('fails', { version: 1 }).step('boom', () => {
      throw new Error('a marker in the error');
    });
    const run = await engine.start(fails, {}).finally(() => engine.close());
    expect(run.status).toBe('failed');
    const bytes = readFileSync(db);
    for (const marker of ['a marker in the error', '"nodes"']) {
      const at = bytes.indexOf(marker);
      expect(at, `${marker} is in the file`).toBeGreaterThan(0);
      bytes[at + 3] = 0;
    }
    writeFileSync(db, bytes);
    const before = sha256(db);

    const damaged = openEngine({ db });
    const isDamaged = {
      name: 'DatabaseError',
      message: expect.stringMatching(/^A value stored in the database is damaged/) as unknown,
    };
    try {
      await expect(damaged.get(run.id)).rejects.toMatchObject(isDamaged);
    } finally {
      await damaged.close();
    }
    const show = await keel(['show', run.id, '--db', db]);
    expect(show.code, show.stderr).toBe(2);
    expect(show.stderr).toMatch(/^keel: A value stored in the database is damaged/);
    expect(show.stderr).not.toMatch(STACK_FRAME);
    expect(sha256(db)).toBe(before);
  });
});
