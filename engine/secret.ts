/**
 * Secrets: values a workflow keeps in its state, input, effect results or signal payloads that must
 * never be written or shown in plain text.
 *
 * A {@link Secret} prints as `[secret]` wherever it goes (string templates, `JSON.stringify`,
 * `console.log`, log fields, `keel show`); only `reveal()` gives the value back. The codec writes
 * one encrypted with AES-256-GCM under the {@link Keyring}'s current key, and reads it back with
 * whichever key of the ring wrote it.
 */
import { createCipheriv, createDecipheriv, createHash, randomBytes } from 'node:crypto';
import { inspect } from 'node:util';
import { ErrorCode, InputError, StateError } from './errors.ts';

const REDACTED = '[secret]';
const KEY_BYTES = 32;
const IV_BYTES = 12;
const TAG_BYTES = 16;

/** The value of a secret read for display only, without its key: it cannot be revealed. */
const UNREADABLE: unique symbol = Symbol('unreadable secret');

/**
 * A value that is encrypted when keel stores it and redacted when anything prints it.
 *
 * Crash and replay: a secret in the state is checkpointed like any other value (encrypted), so a
 * step that runs after a resume, in another process, reveals the same value. Reading it back needs
 * the key it was written with (`KEEL_SECRET_KEY`, or one of `KEEL_SECRET_KEYS_OLD`).
 * @example
 * .step('login', (state) => {
 *   state.token = secret(process.env.API_TOKEN!);
 * })
 * .step('call', async (state) => {
 *   await fetch(url, { headers: { authorization: `Bearer ${state.token!.reveal()}` } });
 * })
 */
export class Secret<T = string> {
  readonly #value: T | typeof UNREADABLE;

  constructor(value: T) {
    this.#value = value;
  }

  /** The value itself. Throws for a secret read by a read-only view (`engine.get`, `keel show`). */
  reveal(): T {
    const value = this.#value;
    if (value === UNREADABLE) {
      throw new StateError(
        'This secret was read for display, without its key, and cannot be revealed.',
        {
          code: ErrorCode.secretRedacted,
          hint: 'Read secrets inside a step of the run: read-only views (engine.get, keel show) never decrypt them.',
        },
      );
    }
    return value;
  }

  toString(): string {
    return REDACTED;
  }

  toJSON(): string {
    return REDACTED;
  }

  [inspect.custom](): string {
    return REDACTED;
  }

  /** A secret that stands in for a stored one in read-only views. */
  static redacted(): Secret<never> {
    return new Secret<never>(UNREADABLE as never);
  }
}

/** Wraps a value so that keel stores it encrypted and never prints it. */
export function secret<T>(value: T): Secret<T> {
  return new Secret(value);
}

/** True for a {@link Secret}. */
export const isSecret = (value: unknown): value is Secret<unknown> => value instanceof Secret;

/** An AES-256 key and its id: the first 8 hex digits of the SHA-256 of the key. */
export type SecretKey = { readonly id: string; readonly key: Buffer };

/** The key secrets are written with (none: writing one fails), and older keys to read them with. */
export type Keyring = { readonly current: SecretKey | null; readonly old: readonly SecretKey[] };

export const EMPTY_KEYRING: Keyring = { current: null, old: [] };

/** A secret as stored: the key id, the IV, the GCM tag and the ciphertext (base64). */
export type SealedSecret = { k: string; iv: string; t: string; c: string };

/** A fresh random key, base64, for `KEEL_SECRET_KEY`. */
export function newSecretKey(): string {
  return randomBytes(KEY_BYTES).toString('base64');
}

/**
 * Parses a key given as 64 hex digits or as base64 of 32 bytes. `source` names where it came from
 * (`KEEL_SECRET_KEY`); the error never repeats the text, which may be a real key with a typo.
 */
export function parseSecretKey(text: string, source: string): SecretKey {
  const trimmed = text.trim();
  let bytes: Buffer | undefined;
  if (/^[0-9a-fA-F]{64}$/.test(trimmed)) bytes = Buffer.from(trimmed, 'hex');
  else if (/^[A-Za-z0-9+/_-]+={0,2}$/.test(trimmed)) {
    const decoded = Buffer.from(trimmed, 'base64');
    if (decoded.length === KEY_BYTES) bytes = decoded;
  }
  if (!bytes) {
    const bad = /[^A-Za-z0-9+/_=-]/.exec(trimmed);
    const found = bad
      ? `it has a character that is neither base64 nor hex, at position ${bad.index + 1}`
      : `it has ${trimmed.length} characters`;
    throw new InputError(
      `${source} is not a usable key: it must be 32 bytes, written as base64 (44 characters) or as 64 hex digits; ${found}.`,
      { hint: 'Make one with `keel keygen`, e.g. export KEEL_SECRET_KEY="$(keel keygen)".' },
    );
  }
  return { id: keyId(bytes), key: bytes };
}

function keyId(key: Buffer): string {
  return createHash('sha256').update(key).digest('hex').slice(0, 8);
}

/** Encrypts `plaintext` under `key` (a fresh random IV each time). */
export function sealSecret(plaintext: string, key: SecretKey): SealedSecret {
  const iv = randomBytes(IV_BYTES);
  const cipher = createCipheriv('aes-256-gcm', key.key, iv);
  const c = Buffer.concat([cipher.update(plaintext, 'utf8'), cipher.final()]);
  return {
    k: key.id,
    iv: iv.toString('base64'),
    t: cipher.getAuthTag().toString('base64'),
    c: c.toString('base64'),
  };
}

/** Decrypts what {@link sealSecret} wrote, with the ring's key of the same id. */
export function openSecret(sealed: SealedSecret, keyring: Keyring): string {
  const keys = keyring.current ? [keyring.current, ...keyring.old] : keyring.old;
  const key = keys.find((k) => k.id === sealed.k);
  if (!key) {
    const known = keys.map((k) => k.id).join(', ') || 'none';
    throw new StateError(
      `A stored secret was encrypted with key ${sealed.k}, which is not among the keys keel was given (${known}); nothing was changed.`,
      {
        code: ErrorCode.secretKeyMissing,
        hint: `Set KEEL_SECRET_KEY to the key whose id is ${sealed.k} (the first 8 hex digits of its SHA-256), or, if a newer key is the current one, list that key in KEEL_SECRET_KEYS_OLD (comma-separated).`,
      },
    );
  }
  try {
    const iv = Buffer.from(sealed.iv, 'base64');
    // The full 16-byte tag, always: a shortened tag would weaken the check.
    const decipher = createDecipheriv('aes-256-gcm', key.key, iv, { authTagLength: TAG_BYTES });
    decipher.setAuthTag(Buffer.from(sealed.t, 'base64'));
    const plain = Buffer.concat([
      decipher.update(Buffer.from(sealed.c, 'base64')),
      decipher.final(),
    ]);
    return plain.toString('utf8');
  } catch (error) {
    throw new StateError(
      `A stored secret (key ${sealed.k}) failed its integrity check: its bytes in the database were changed or damaged, so it cannot be read.`,
      {
        code: ErrorCode.secretDamaged,
        cause: error,
        hint: 'Restore the database from a backup, or stop the run with `keel cancel RUN_ID` and start it again (a rollback needs the state, which this secret is part of).',
      },
    );
  }
}

/** Why a secret at `where` (`state.token`) cannot be written: no key is set. */
export function noKeyToWrite(where: string): StateError {
  return new StateError(
    `Cannot store ${where}: it holds a secret, and no key is set to encrypt it; nothing was written.`,
    {
      code: ErrorCode.secretKeyMissing,
      path: where,
      hint: 'Set KEEL_SECRET_KEY to a key made with `keel keygen` (32 bytes, base64 or hex), or pass openEngine({ secretKey }).',
    },
  );
}
