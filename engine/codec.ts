/**
 * The state codec: how a workflow's state, its patches and effect results are written down.
 *
 * It is JSON with tagged objects for what JSON cannot say, so that a state round-trips exactly: Date,
 * Map, Set, BigInt, `undefined` (inside objects and arrays), NaN, ±Infinity and -0. Anything else that
 * is not plain data (functions, symbols, class instances, cycles) is refused with the path of the bad
 * field, before anything is written.
 *
 * A {@link Secret} is written encrypted under the keyring's current key (its value encoded first, then
 * sealed with AES-256-GCM), and read back with the key that wrote it; read-only views decode it as a
 * redacted secret without decrypting anything. The keyring is passed in, never looked up here.
 */
import { DatabaseError, StateError } from './errors.ts';
import {
  EMPTY_KEYRING,
  Secret,
  noKeyToWrite,
  openSecret,
  sealSecret,
  type Keyring,
  type SealedSecret,
} from './secret.ts';

const TAG = '$';
type Tagged = { [TAG]: string; v?: unknown };

type PathSegment = string | number | { mapKey: unknown };

export type EncodeOptions = {
  /** The keys to encrypt secrets with; without a current key, a secret is refused. */
  secrets?: Keyring;
  /** Where `value` sits in the state, for the messages of refusals (the root by default). */
  path?: PathSegment[];
};

export type DecodeOptions = {
  /** The keys to decrypt secrets with, or `'redacted'` to read them without decrypting. */
  secrets?: Keyring | 'redacted';
};

/** What one encoding walk carries down: the objects above the current one, and the keys. */
type Walk = { ancestors: Set<object>; secrets: Keyring };

/**
 * Encodes `value` as a string; throws {@link StateError} naming the first field it cannot keep (or a
 * secret it has no key for).
 */
export function encode(value: unknown, options: EncodeOptions = {}): string {
  const walk: Walk = { ancestors: new Set(), secrets: options.secrets ?? EMPTY_KEYRING };
  return JSON.stringify(toTagged(value, options.path ?? [], walk));
}

/** Decodes what {@link encode} wrote. */
export function decode<T = unknown>(text: string, options: DecodeOptions = {}): T {
  return fromTagged(parseStored(text), options.secrets ?? EMPTY_KEYRING) as T;
}

/** JSON.parse of stored text, which fails only when the file was damaged (a zeroed byte, say). */
export function parseStored(text: string): unknown {
  try {
    return JSON.parse(text);
  } catch (error) {
    throw new DatabaseError(
      `A value stored in the database is damaged (it is not the JSON keel wrote: ${(error as Error).message}).`,
      {
        cause: error,
        hint: 'The file was changed outside keel (a failing disk, an interrupted copy): restore it from a backup.',
      },
    );
  }
}

function toTagged(value: unknown, path: PathSegment[], walk: Walk): unknown {
  switch (typeof value) {
    case 'string':
    case 'boolean':
      return value;
    case 'number':
      if (Number.isFinite(value) && !Object.is(value, -0)) return value;
      return { [TAG]: 'N', v: Object.is(value, -0) ? '-0' : String(value) };
    case 'bigint':
      return { [TAG]: 'B', v: value.toString() };
    case 'undefined':
      return { [TAG]: 'U' };
    case 'function':
      throw refusal('a function', path);
    case 'symbol':
      throw refusal('a symbol', path);
    case 'object':
      break;
  }
  if (value === null) return null;
  const object = value;
  if (walk.ancestors.has(object))
    throw refusal('a reference to one of its own ancestors (a cycle)', path);
  walk.ancestors.add(object);
  try {
    return taggedObject(object, path, walk);
  } finally {
    walk.ancestors.delete(object);
  }
}

function taggedObject(object: object, path: PathSegment[], walk: Walk): unknown {
  if (Array.isArray(object)) {
    const out = new Array<unknown>(object.length);
    for (let i = 0; i < object.length; i++) {
      path.push(i);
      out[i] = toTagged(object[i], path, walk);
      path.pop();
    }
    return out;
  }
  const proto = Object.getPrototypeOf(object) as object | null;
  if (proto === Object.prototype || proto === null) {
    // No prototype, so that a key named `__proto__` (JSON.parse makes them) is kept as data.
    const out = Object.create(null) as Record<string, unknown>;
    for (const key of Object.keys(object)) {
      path.push(key);
      out[key] = toTagged((object as Record<string, unknown>)[key], path, walk);
      path.pop();
    }
    if (proto === null) return { [TAG]: 'P', v: out };
    return TAG in out ? { [TAG]: 'O', v: out } : out;
  }
  if (object instanceof Date) {
    const time = object.getTime();
    return { [TAG]: 'D', v: Number.isNaN(time) ? null : time };
  }
  if (object instanceof Map) {
    const entries: unknown[] = [];
    for (const [key, entry] of object) {
      path.push({ mapKey: key });
      entries.push([toTagged(key, path, walk), toTagged(entry, path, walk)]);
      path.pop();
    }
    return { [TAG]: 'M', v: entries };
  }
  if (object instanceof Set) {
    const items: unknown[] = [];
    let i = 0;
    for (const item of object) {
      path.push(i++);
      items.push(toTagged(item, path, walk));
      path.pop();
    }
    return { [TAG]: 'S', v: items };
  }
  if (object instanceof Secret) {
    const key = walk.secrets.current;
    if (!key) throw noKeyToWrite(formatPath(path));
    const inner = JSON.stringify(toTagged(object.reveal(), path, walk));
    return { [TAG]: 'E', v: sealSecret(inner, key) };
  }
  const kind = (proto as { constructor?: { name?: string } }).constructor?.name || 'object';
  throw refusal(`an instance of ${kind}`, path);
}

function fromTagged(node: unknown, secrets: Keyring | 'redacted'): unknown {
  if (node === null || typeof node !== 'object') return node;
  if (Array.isArray(node)) {
    for (let i = 0; i < node.length; i++) node[i] = fromTagged(node[i], secrets);
    return node;
  }
  const record = node as Record<string, unknown>;
  if (!(TAG in record)) {
    for (const key of Object.keys(record)) record[key] = fromTagged(record[key], secrets);
    return record;
  }
  const { [TAG]: tag, v } = record as Tagged;
  switch (tag) {
    case 'U':
      return undefined;
    case 'N':
      return v === '-0' ? -0 : Number(v);
    case 'B':
      return BigInt(v as string);
    case 'D':
      return new Date(v === null ? NaN : (v as number));
    case 'M':
      return new Map(
        (v as [unknown, unknown][]).map(([k, e]) => [
          fromTagged(k, secrets),
          fromTagged(e, secrets),
        ]),
      );
    case 'S':
      return new Set((v as unknown[]).map((item) => fromTagged(item, secrets)));
    case 'E':
      if (secrets === 'redacted') return Secret.redacted();
      return new Secret(fromTagged(JSON.parse(openSecret(v as SealedSecret, secrets)), secrets));
    case 'P': {
      // An object made with Object.create(null) comes back without a prototype, as it was.
      const fields = Object.assign(Object.create(null) as Record<string, unknown>, v);
      for (const key of Object.keys(fields)) fields[key] = fromTagged(fields[key], secrets);
      return fields;
    }
    case 'O': {
      // A plain object that has a `$` key of its own: decode its fields, never the object itself
      // as a tag (its `$` is data, e.g. `{ $: 'D', v: 5 }` is not a Date).
      const fields = v as Record<string, unknown>;
      for (const key of Object.keys(fields)) fields[key] = fromTagged(fields[key], secrets);
      return fields;
    }
    default:
      throw new StateError(
        `Stored value has an unknown tag "${tag}": it was written by a newer keel.`,
      );
  }
}

function refusal(what: string, path: PathSegment[]): StateError {
  const where = formatPath(path);
  return new StateError(`Cannot checkpoint ${where}: it holds ${what}.`, {
    path: where,
    hint: 'State must be plain data (objects, arrays, strings, numbers, booleans, null, undefined, Date, Map, Set, BigInt, secret(…)). Keep handles, clients and class instances outside the state.',
  });
}

/** `state.a.b[2]`, with Map entries as `.get("key")`. */
export function formatPath(path: readonly PathSegment[]): string {
  let out = 'state';
  for (const segment of path) {
    if (typeof segment === 'number') out += `[${segment}]`;
    else if (typeof segment === 'string')
      out += /^[A-Za-z_$][\w$]*$/.test(segment) ? `.${segment}` : `[${JSON.stringify(segment)}]`;
    else out += `.get(${describeKey(segment.mapKey)})`;
  }
  return out;
}

function describeKey(key: unknown): string {
  if (typeof key === 'string') return JSON.stringify(key);
  if (typeof key === 'bigint') return `${key}n`;
  if (typeof key === 'object' && key !== null) return '{…}';
  return String(key);
}

/**
 * A JSON-safe view of a value for display and `--json` output: BigInt as a string, Date as ISO text,
 * Map as an object (or entry list when its keys are not strings), Set as an array, a secret as
 * `[secret]`.
 */
export function toDisplayJson(value: unknown): unknown {
  if (typeof value === 'bigint') return value.toString();
  if (typeof value === 'number' && !Number.isFinite(value)) return String(value);
  if (value === null || typeof value !== 'object') return value;
  if (value instanceof Secret) return value.toJSON();
  if (value instanceof Date) return Number.isNaN(value.getTime()) ? null : value.toISOString();
  if (Array.isArray(value)) return value.map(toDisplayJson);
  if (value instanceof Set) return [...value].map(toDisplayJson);
  if (value instanceof Map) {
    const keys = [...value.keys()];
    if (keys.every((k) => typeof k === 'string')) {
      return Object.fromEntries([...value].map(([k, v]) => [k, toDisplayJson(v)]));
    }
    return [...value].map(([k, v]) => [toDisplayJson(k), toDisplayJson(v)]);
  }
  const out: Record<string, unknown> = {};
  for (const [key, entry] of Object.entries(value)) out[key] = toDisplayJson(entry);
  return out;
}
