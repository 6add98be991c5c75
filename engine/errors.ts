/**
 * Every error keel raises derives from {@link KeelError}. Subclasses are grouped by what the engine does
 * next (stop, retry later, give up on a lease, refuse a definition), and each carries a string `code`.
 * Errors are stored in the database and read back in other processes, so guards test `name`, never
 * `instanceof`, and {@link serializeError} / {@link deserializeError} are the one round-trip pair.
 */

export const ErrorCode = {
  definition: 'DEFINITION',
  input: 'INPUT',
  notFound: 'NOT_FOUND',
  state: 'STATE_UNSERIALIZABLE',
  stateTooLarge: 'STATE_TOO_LARGE',
  leaseHeld: 'LEASE_HELD',
  leaseLost: 'LEASE_LOST',
  versionMismatch: 'VERSION_MISMATCH',
  notResumable: 'NOT_RESUMABLE',
  stepFailed: 'STEP_FAILED',
  stepLimit: 'STEP_LIMIT',
  effectUnknown: 'EFFECT_OUTCOME_UNKNOWN',
  compensation: 'COMPENSATION_FAILED',
  cancelled: 'CANCELLED',
  database: 'DATABASE',
  terminal: 'TERMINAL',
  staleState: 'STALE_STATE',
  llmUnavailable: 'LLM_UNAVAILABLE',
  llmRejected: 'LLM_REJECTED',
  llmJournalMismatch: 'LLM_JOURNAL_MISMATCH',
  waitTimeout: 'WAIT_TIMEOUT',
  /** A secret must be written with no key set, or was written with a key keel was not given. */
  secretKeyMissing: 'SECRET_KEY_MISSING',
  /** A stored secret failed its integrity check: its bytes were changed. */
  secretDamaged: 'SECRET_DAMAGED',
  /** `reveal()` on a secret that a read-only view read without its key. */
  secretRedacted: 'SECRET_REDACTED',
} as const;
export type ErrorCode = (typeof ErrorCode)[keyof typeof ErrorCode];

export type KeelErrorOptions = { cause?: unknown; runId?: string; step?: string; hint?: string };

/** Base of every keel error: a stable `code`, the run and step it concerns, and a hint for the user. */
export class KeelError extends Error {
  override name = 'KeelError';
  readonly code: ErrorCode;
  readonly runId: string | undefined;
  readonly step: string | undefined;
  readonly hint: string | undefined;

  constructor(code: ErrorCode, message: string, options: KeelErrorOptions = {}) {
    super(options.hint ? `${message}\n  ${options.hint}` : message, { cause: options.cause });
    this.code = code;
    this.runId = options.runId;
    this.step = options.step;
    this.hint = options.hint;
  }
}

/** The workflow graph is wrong: an unknown route target, an unreachable step, a duplicate name. */
export class DefinitionError extends KeelError {
  override name = 'DefinitionError';
  constructor(message: string, options?: KeelErrorOptions) {
    super(ErrorCode.definition, message, options);
  }
}

/** What the user gave keel is wrong (a path, an id, an input); nothing was changed. */
export class InputError extends KeelError {
  override name = 'InputError';
  constructor(message: string, options?: KeelErrorOptions & { code?: ErrorCode }) {
    super(options?.code ?? ErrorCode.input, message, options);
  }
}

/** The state cannot be checkpointed: a value keel cannot store, or a state over the size limit. */
export class StateError extends KeelError {
  override name = 'StateError';
  readonly path: string | undefined;
  constructor(
    message: string,
    options: KeelErrorOptions & { path?: string; code?: ErrorCode } = {},
  ) {
    super(options.code ?? ErrorCode.state, message, options);
    this.path = options.path;
  }
}

/**
 * Another owner holds the run (`LEASE_HELD`) or took it over from this process (`LEASE_LOST`). A
 * process that lost its lease stops at once: its next write would be refused anyway.
 */
export class LeaseError extends KeelError {
  override name = 'LeaseError';
  constructor(code: 'LEASE_HELD' | 'LEASE_LOST', message: string, options?: KeelErrorOptions) {
    super(code, message, options);
  }
}

/**
 * Thrown by a step, an effect or a compensation to say that trying again cannot help (a rejected
 * request, an edited file): keel skips the remaining attempts.
 * @example
 * if (response.status === 400) throw new TerminalError(`the API rejected the post: ${await response.text()}`);
 */
export class TerminalError extends KeelError {
  override name = 'TerminalError';
  constructor(message: string, options?: KeelErrorOptions) {
    super(ErrorCode.terminal, message, options);
  }
}

/**
 * `ctx.waitFor` reached its timeout before the signal came. The workflow may catch it; once timed
 * out, the wait stays timed out, whatever arrives later.
 */
export class WaitTimeoutError extends KeelError {
  override name = 'WaitTimeoutError';
  readonly wait: string;
  constructor(runId: string, step: string, wait: string, timeoutMs: number) {
    super(
      ErrorCode.waitTimeout,
      `Step "${step}" of run ${runId} waited ${timeoutMs} ms for signal "${wait}", which did not come.`,
      {
        runId,
        step,
        hint: `Catch it in the step to go on without the signal, or send it with \`keel signal ${runId} ${wait}\` before the timeout.`,
      },
    );
    this.wait = wait;
  }
}

/** Why a cancelled run stopped: `engine.cancel` (or `keel cancel`), with or without a rollback. */
export class CancelledError extends KeelError {
  override name = 'CancelledError';
  readonly rollback: boolean;
  constructor(runId: string, rollback: boolean) {
    super(ErrorCode.cancelled, `Run ${runId} was cancelled.`, { runId });
    this.rollback = rollback;
  }
}

/** A step ran out of attempts; `cause` is the last error the step threw. */
export class StepFailedError extends KeelError {
  override name = 'StepFailedError';
  readonly attempts: number;
  constructor(message: string, options: KeelErrorOptions & { attempts: number }) {
    super(ErrorCode.stepFailed, message, options);
    this.attempts = options.attempts;
  }
}

/** An effect was started and its outcome cannot be known: it neither honours keys nor reconciles. */
export class EffectOutcomeUnknownError extends KeelError {
  override name = 'EffectOutcomeUnknownError';
  readonly key: string;
  constructor(message: string, options: KeelErrorOptions & { key: string }) {
    super(ErrorCode.effectUnknown, message, options);
    this.key = options.key;
  }
}

/** Rollback stopped at a compensation that kept failing; `remaining` lists the effects still applied. */
export class CompensationError extends KeelError {
  override name = 'CompensationError';
  readonly remaining: string[];
  /** The failure that started the rollback (its serialized error, as stored), if the run failed. */
  readonly failure: string | undefined;
  constructor(
    message: string,
    options: KeelErrorOptions & { remaining: string[]; failure?: string },
  ) {
    super(ErrorCode.compensation, message, options);
    this.remaining = options.remaining;
    this.failure = options.failure;
  }
}

/** The database cannot be used as it is: not a keel database, corrupt, too new, or locked. */
export class DatabaseError extends KeelError {
  override name = 'DatabaseError';
  /** Locked by another process past the busy timeout: waiting cures it. */
  readonly busy: boolean;
  constructor(message: string, options?: KeelErrorOptions & { busy?: boolean }) {
    super(ErrorCode.database, message, options);
    this.busy = options?.busy === true;
  }
}

/** A database locked past the busy timeout (by a stalled process, a long transaction): transient. */
export const isDatabaseBusy = (error: unknown): boolean =>
  error instanceof DatabaseError && error.busy;

const isNamed =
  <T extends Error>(name: string) =>
  (error: unknown): error is T =>
    error instanceof Error && error.name === name;

const CODES: ReadonlySet<string> = new Set(Object.values(ErrorCode));

/** A keel error, including one read back from the database (recognised by its code). */
export const isKeelError = (error: unknown): error is KeelError =>
  error instanceof Error && CODES.has((error as Partial<KeelError>).code ?? '');
/** True for a keel error with this code, including one read back from the database. */
export const hasCode = (error: unknown, code: ErrorCode): boolean =>
  isKeelError(error) && error.code === code;
export const isDefinitionError = isNamed<DefinitionError>('DefinitionError');
export const isInputError = isNamed<InputError>('InputError');
export const isStateError = isNamed<StateError>('StateError');
export const isLeaseError = isNamed<LeaseError>('LeaseError');
export const isTerminalError = isNamed<TerminalError>('TerminalError');
export const isStepFailedError = isNamed<StepFailedError>('StepFailedError');
export const isCompensationError = isNamed<CompensationError>('CompensationError');
export const isDatabaseError = isNamed<DatabaseError>('DatabaseError');
export const isEffectOutcomeUnknownError = isNamed<EffectOutcomeUnknownError>(
  'EffectOutcomeUnknownError',
);

/** An error as stored: plain data, with its chain of causes. */
export type SerializedError = {
  name: string;
  message: string;
  code?: string;
  step?: string;
  stack?: string;
  cause?: SerializedError;
  [extra: string]: unknown;
};

const MAX_CAUSE_DEPTH = 8;

/** Turns any thrown value into plain data that survives JSON, keeping `code`, `step` and the causes. */
export function serializeError(error: unknown, depth = 0): SerializedError {
  if (!(error instanceof Error)) {
    return { name: 'NonError', message: describeThrown(error) };
  }
  const out: SerializedError = { name: error.name, message: error.message };
  if (error.stack) out.stack = error.stack;
  for (const [field, value] of Object.entries(error)) {
    if (field === 'cause' || value === undefined) continue;
    if (['string', 'number', 'boolean'].includes(typeof value)) out[field] = value;
    else if (Array.isArray(value) && value.every((v) => typeof v === 'string')) out[field] = value;
  }
  if (error.cause !== undefined && depth < MAX_CAUSE_DEPTH) {
    out.cause = serializeError(error.cause, depth + 1);
  }
  return out;
}

/** Rebuilds an Error from {@link serializeError}'s output; `name`, `code` and causes come back. */
export function deserializeError(data: SerializedError): Error {
  const cause = data.cause ? deserializeError(data.cause) : undefined;
  const error = new Error(data.message, cause ? { cause } : undefined);
  for (const [field, value] of Object.entries(data)) {
    if (field !== 'cause' && field !== 'message')
      (error as unknown as Record<string, unknown>)[field] = value;
  }
  return error;
}

function describeThrown(value: unknown): string {
  if (typeof value === 'string') return value;
  try {
    return JSON.stringify(value) ?? String(value);
  } catch {
    return String(value);
  }
}

/** The first line of an error's message, for one-line displays. */
export function errorSummary(error: SerializedError | undefined): string {
  if (!error) return '';
  return `${error.name}: ${error.message.split('\n')[0] ?? ''}`;
}
