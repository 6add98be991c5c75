/**
 * The `keel` command line. Exit status: 0 when the run completed (or the command succeeded), 1 when
 * the run failed or could not proceed, 2 for usage errors (bad arguments, unknown ids, bad files).
 */
import { Command, CommanderError, InvalidArgumentError, Option } from 'commander';
import { existsSync, readFileSync, statSync } from 'node:fs';
import { resolve } from 'node:path';
import { toDisplayJson } from '../../engine/codec.ts';
import type { Engine, RunResult } from '../../engine/engine.ts';
import {
  ErrorCode,
  InputError,
  isInputError,
  isKeelError,
  serializeError,
} from '../../engine/errors.ts';
import { newSecretKey } from '../../engine/secret.ts';
import { RunStatus } from '../../engine/store.ts';
import { DEFAULT_DB, openEngine } from '../index.ts';
import { consoleLogger, parseLogLevel } from '../console-logger.ts';
import { loadWorkflow } from '../loader.ts';
import { toMs } from '../../engine/time.ts';
import {
  formatDeadLetter,
  formatDeadLetters,
  formatList,
  formatPlan,
  formatRun,
} from './format.ts';
import { createProgress, type Progress } from './progress.ts';
import { registerDoctor } from './doctor.ts';

type GlobalOptions = {
  db?: string;
  json?: boolean;
  synchronous?: 'NORMAL' | 'FULL';
  progress?: boolean;
};

const USAGE_CODES: readonly string[] = [
  ErrorCode.input,
  ErrorCode.notFound,
  ErrorCode.definition,
  ErrorCode.database,
];

class Cli {
  private engine: Engine | undefined;
  private progress: Progress | undefined;
  private interrupted = false;

  constructor(private readonly options: GlobalOptions) {}

  get json(): boolean {
    return this.options.json === true;
  }

  /** `usesLlm`: the command may run steps, so its LLM configuration is checked now. */
  open(mustExist: boolean, usesLlm = true): Engine {
    const db = resolve(this.options.db ?? process.env.KEEL_DB ?? DEFAULT_DB);
    if (mustExist && (!existsSync(db) || statSync(db).size === 0)) {
      throw new InputError(`No keel database at ${db}.`, {
        hint: 'Start a run first with `keel run FILE`, or point --db (or KEEL_DB) at an existing database.',
      });
    }
    this.progress = createProgress(process.stderr, !this.json && this.options.progress !== false);
    const progress = this.progress;
    this.engine = openEngine({
      db,
      logger: consoleLogger({
        level: parseLogLevel(process.env.KEEL_LOG),
        before: () => progress.clear(),
      }),
      ...(this.options.synchronous ? { synchronous: this.options.synchronous } : {}),
      ...(usesLlm ? {} : { llm: () => Promise.reject(new Error('this command calls no LLM')) }),
      onEvent: (event) => progress.onEvent(event),
    });
    this.handleSignals();
    return this.engine;
  }

  async close(): Promise<void> {
    this.progress?.stop();
    await this.engine?.close();
  }

  print(human: string, data: unknown): void {
    process.stdout.write(`${this.json ? JSON.stringify(toDisplayJson(data), null, 2) : human}\n`);
  }

  /**
   * Shows a finished run and turns its status into the exit code. `keel run` passes only
   * `completed`: a run that failed and rolled itself back (rollbackOnFailure) did not do its job.
   */
  async report(
    result: RunResult,
    ok: readonly string[] = [RunStatus.completed, RunStatus.rolledBack],
  ): Promise<number> {
    this.progress?.stop();
    const view = await this.engine!.get(result.id);
    if (this.json) this.print('', { ...view, rollback: result.rollback });
    else this.print(summaryOf(view.status, result, view.effects), null);
    return ok.includes(result.status) ? 0 : 1;
  }

  /**
   * `keel worker`: the first SIGINT or SIGTERM stops it gracefully (`onStop`), the second at once.
   */
  stopWith(onStop: (signal: NodeJS.Signals) => void): void {
    this.onStop = onStop;
  }

  private onStop: ((signal: NodeJS.Signals) => void) | undefined;

  /** Ctrl-C: stop at the next milestone and hand the lease back, so `keel resume` can go on at once. */
  private handleSignals(): void {
    const stop = (signal: NodeJS.Signals) => {
      if (this.onStop && !this.interrupted) {
        this.interrupted = true;
        process.stderr.write(`\nkeel: ${signal}: finishing the runs in hand, then stopping\n`);
        process.once(signal, () => process.exit(signal === 'SIGINT' ? 130 : 143));
        this.onStop(signal);
        return;
      }
      if (this.interrupted) process.exit(130);
      this.interrupted = true;
      process.stderr.write(
        `\nkeel: ${signal}: stopping; resume later with \`keel resume --all\`\n`,
      );
      void this.close().finally(() => process.exit(signal === 'SIGINT' ? 130 : 143));
    };
    process.once('SIGINT', stop);
    process.once('SIGTERM', stop);
  }
}

function summaryOf(
  status: string,
  result: RunResult,
  effects: { name: string; key: string; status: string; result: unknown }[],
) {
  const lines = [`run ${result.id} (${result.workflow}): ${status}`];
  if (result.error) lines.push(`  error: ${result.error.message}`);
  for (const effect of effects) {
    lines.push(
      `  effect ${effect.name} [${effect.key}]: ${effect.status}${effect.result !== null ? ` ${JSON.stringify(toDisplayJson(effect.result))}` : ''}`,
    );
  }
  if (result.rollback) {
    const { compensated, skipped, remaining } = result.rollback;
    lines.push(`  compensated: ${compensated.join(', ') || 'none'}`);
    if (skipped.length)
      lines.push(`  no compensation declared (left applied): ${skipped.join(', ')}`);
    if (remaining.length) lines.push(`  still applied: ${remaining.join(', ')}`);
  }
  if (status === RunStatus.waiting || status === RunStatus.queued)
    lines.push(
      `  waiting in the queue: \`keel worker\` carries it on when it is due (\`keel show ${result.id}\` says why)`,
    );
  if (status === RunStatus.failed)
    lines.push(
      `  inspect with \`keel show ${result.id}\`; retry with \`keel resume ${result.id}\` or undo with \`keel rollback ${result.id}\``,
    );
  return lines.join('\n');
}

function parseInput(text: string | undefined): object {
  if (text === undefined) return {};
  let source = text;
  if (text.startsWith('@')) {
    const file = resolve(text.slice(1));
    if (!existsSync(file))
      throw new InputError(`Input file ${file} does not exist.`, {
        hint: 'Use --input @path/to/input.json.',
      });
    source = readFileSync(file, 'utf8');
  }
  let value: unknown;
  try {
    value = JSON.parse(source);
  } catch (error) {
    throw new InputError(`--input is not valid JSON: ${(error as Error).message}.`, {
      hint: `Quote it for the shell, e.g. --input '{"topic": "leases"}', or pass a file with --input @input.json.`,
    });
  }
  if (typeof value !== 'object' || value === null || Array.isArray(value)) {
    throw new InputError('--input must be a JSON object.', {
      hint: `Got ${source.slice(0, 40)}; wrap it, e.g. {"topic": "leases"}.`,
    });
  }
  return value;
}

/** The run's workflow loaded from where its file is now, to resume or roll back with. */
async function movedWorkflow(engine: Engine, id: string, file: string) {
  const { workflow } = await engine.get(id);
  return { workflow: await loadWorkflow(file, workflow), module: resolve(file) };
}

function positiveInteger(flag: string) {
  return (value: string): number => {
    const n = Number(value);
    if (!Number.isInteger(n) || n < 1) {
      throw new InvalidArgumentError(`${flag} takes a whole number of at least 1, got "${value}".`);
    }
    return n;
  };
}

/** A signal payload: any JSON value (or @file.json). */
function parsePayload(text: string): unknown {
  const source = text.startsWith('@') ? readFileSync(text.slice(1), 'utf8') : text;
  try {
    return JSON.parse(source) as unknown;
  } catch {
    throw new InputError(`--payload is not JSON: ${text.slice(0, 80)}`, {
      hint: 'Quote it for the shell, e.g. --payload \'{"approved":true}\', or give @file.json.',
    });
  }
}

function integer(flag: string) {
  return (value: string): number => {
    const n = Number(value);
    if (!Number.isInteger(n)) throw new InvalidArgumentError(`${flag} must be an integer.`);
    return n;
  };
}

/** A duration argument: milliseconds or a string such as "20m", checked here for a clear error. */
function durationArg(value: string): number {
  return toMs(/^\d+$/.test(value) ? Number(value) : value, '--delay');
}

function packageVersion(): string {
  const file = new URL('../../package.json', import.meta.url);
  return (JSON.parse(readFileSync(file, 'utf8')) as { version: string }).version;
}

function program(): Command {
  const cli = (command: Command) => new Cli(command.optsWithGlobals<GlobalOptions>());
  const root = new Command('keel')
    .description(
      'Durable workflows: typed step graphs checkpointed to SQLite, resumed after a crash, rolled back cleanly.',
    )
    .option('--db <path>', `database file (default: $KEEL_DB or ${DEFAULT_DB})`)
    .option('--json', 'machine-readable output on stdout')
    .addOption(
      new Option(
        '--synchronous <mode>',
        'SQLite durability: NORMAL survives a crash, FULL a power cut',
      ).choices(['NORMAL', 'FULL']),
    )
    .option('--no-progress', 'no progress output on stderr')
    .version(packageVersion(), '-V, --version')
    .showHelpAfterError()
    .exitOverride();

  root
    .command('run')
    .description('start a run of a workflow file and drive it to the end')
    .argument('<file>', 'a .ts or .js file exporting a workflow')
    .option('--workflow <name>', 'which workflow, when the file exports several')
    .option('--input <json>', 'input as JSON, or @file.json')
    .action(async (file: string, opts: { workflow?: string; input?: string }, command: Command) => {
      const c = cli(command);
      const input = parseInput(opts.input);
      const wf = await loadWorkflow(file, opts.workflow);
      const engine = c.open(false);
      return run(c, async () =>
        c.report(await engine.start(wf, input, { module: resolve(file) }), [RunStatus.completed]),
      );
    });

  root
    .command('resume')
    .description('continue interrupted runs from their last checkpoint')
    .argument('[run-id]', 'the run to resume')
    .option('--all', 'every run left running by a process that is gone')
    .option('--plan', 'show what resuming would do, change nothing')
    .option(
      '--allow-version-change',
      'carry a run on under a changed graph whose version was raised',
    )
    .option('--file <path>', "the workflow's file, when it moved since the run started")
    .action(
      async (
        id: string | undefined,
        opts: { all?: boolean; plan?: boolean; allowVersionChange?: boolean; file?: string },
        command: Command,
      ) => {
        const c = cli(command);
        if (!id && !opts.all)
          throw new InputError('Give a run id, or --all.', { hint: 'List runs with `keel ls`.' });
        if (id && opts.all) throw new InputError('Give a run id or --all, not both.');
        if (opts.file && !id) throw new InputError('--file needs a run id.');
        const engine = c.open(true);
        const allowVersionChange = opts.allowVersionChange === true;
        const moved = id && opts.file ? await movedWorkflow(engine, id, opts.file) : {};
        if (opts.plan) {
          if (!id) throw new InputError('--plan needs a run id.');
          const plan = await engine.plan(id, { allowVersionChange, ...moved });
          c.print(formatPlan(plan), plan);
          return run(c, async () => 0);
        }
        if (id)
          return run(c, async () =>
            c.report(await engine.resume(id, { allowVersionChange, ...moved })),
          );
        return run(c, async () => {
          const results = await engine.resumeAll({ allowVersionChange });
          const failed = results.filter(
            (r) =>
              !('status' in r) ||
              (r.status !== RunStatus.completed && r.status !== RunStatus.rolledBack),
          );
          const lines = results.map((r) =>
            'status' in r
              ? `${r.id} (${r.workflow}): ${r.status}${r.error ? ` — ${r.error.message.split('\n')[0]}` : ''}`
              : `${r.id}: not resumed — ${r.error.message.split('\n')[0]}`,
          );
          c.print(results.length ? lines.join('\n') : 'no interrupted runs to resume', results);
          return failed.length ? 1 : 0;
        });
      },
    );

  root
    .command('rollback')
    .description("run the compensations of a run's applied effects, newest first")
    .argument('<run-id>')
    .option('--file <path>', "the workflow's file, when it moved since the run started")
    .action(async (id: string, opts: { file?: string }, command: Command) => {
      const c = cli(command);
      const engine = c.open(true);
      const moved = opts.file ? await movedWorkflow(engine, id, opts.file) : {};
      return run(c, async () => c.report(await engine.rollback(id, moved)));
    });

  root
    .command('ls')
    .description('list runs, newest first')
    .addOption(
      new Option('--status <status>', 'only runs with this status').choices(
        Object.values(RunStatus),
      ),
    )
    .option('--workflow <name>', 'only runs of this workflow')
    .option('--limit <n>', 'at most this many', positiveInteger('--limit'))
    .action(
      async (opts: { status?: RunStatus; workflow?: string; limit?: number }, command: Command) => {
        const c = cli(command);
        const engine = c.open(true, false);
        return run(c, async () => {
          const runs = await engine.list({
            ...(opts.status ? { status: opts.status } : {}),
            ...(opts.workflow ? { workflow: opts.workflow } : {}),
            ...(opts.limit ? { limit: opts.limit } : {}),
          });
          c.print(formatList(runs), runs);
          return 0;
        });
      },
    );

  root
    .command('show')
    .description('a run: its steps, attempts, effects with keys, durations, errors and state')
    .argument('<run-id>')
    .action(async (id: string, _opts: object, command: Command) => {
      const c = cli(command);
      const engine = c.open(true, false);
      return run(c, async () => {
        const view = await engine.get(id);
        c.print(formatRun(view), view);
        return 0;
      });
    });

  root
    .command('enqueue')
    .description('add a run to the queue, for `keel worker` to start')
    .argument('<file>', 'a .ts or .js file exporting a workflow')
    .option('--workflow <name>', 'which workflow, when the file exports several')
    .option('--input <json>', 'input as JSON, or @file.json')
    .option('--priority <n>', 'higher runs first (default 0)', integer('--priority'))
    .option('--key <key>', 'deduplication: a second enqueue with this key adds nothing')
    .option('--delay <duration>', 'not before this long from now, e.g. 30s or 20m')
    .action(
      async (
        file: string,
        opts: {
          workflow?: string;
          input?: string;
          priority?: number;
          key?: string;
          delay?: string;
        },
        command: Command,
      ) => {
        const c = cli(command);
        const input = parseInput(opts.input);
        const delay = opts.delay !== undefined ? durationArg(opts.delay) : undefined;
        const wf = await loadWorkflow(file, opts.workflow);
        const engine = c.open(false);
        return run(c, async () => {
          const queued = await engine.enqueue(wf, input, {
            module: resolve(file),
            ...(opts.priority !== undefined ? { priority: opts.priority } : {}),
            ...(opts.key !== undefined ? { key: opts.key } : {}),
            ...(delay !== undefined ? { delay } : {}),
          });
          c.print(
            queued.created
              ? `queued run ${queued.runId}`
              : `already queued as run ${queued.runId} (key ${opts.key}); nothing added`,
            queued,
          );
          return 0;
        });
      },
    );

  root
    .command('worker')
    .description('work the queue: start and continue due runs, until stopped (SIGINT or SIGTERM)')
    .option(
      '--concurrency <n>',
      'runs carried on at once (default 4)',
      positiveInteger('--concurrency'),
    )
    .option(
      '--poll <ms>',
      'longest sleep between looks at the queue (default 1000)',
      positiveInteger('--poll'),
    )
    .option(
      '--grace <ms>',
      'on stop, time for runs in progress to finish (default 10000)',
      positiveInteger('--grace'),
    )
    .option('--until-idle', 'stop once nothing runs and nothing waits for a due time')
    .action(
      async (
        opts: { concurrency?: number; poll?: number; grace?: number; untilIdle?: boolean },
        command: Command,
      ) => {
        const c = cli(command);
        const engine = c.open(false);
        const stop = new AbortController();
        c.stopWith(() => stop.abort());
        return run(c, async () => {
          const report = await engine.work({
            signal: stop.signal,
            ...(opts.concurrency ? { concurrency: opts.concurrency } : {}),
            ...(opts.poll ? { pollMs: opts.poll } : {}),
            ...(opts.grace ? { graceMs: opts.grace } : {}),
            untilIdle: opts.untilIdle === true,
          });
          c.print(
            `worker stopped: ${report.completed} completed, ${report.failed} failed, ${report.waiting} waiting, ${report.errors} not carried on`,
            report,
          );
          return 0;
        });
      },
    );

  root
    .command('signal')
    .description('send a signal to a run; a ctx.waitFor of that name takes it')
    .argument('<run-id>')
    .argument('<name>', 'the name the workflow waits for')
    .option('--payload <json>', 'the payload as JSON, or @file.json')
    .action(async (id: string, name: string, opts: { payload?: string }, command: Command) => {
      const c = cli(command);
      const payload: unknown = opts.payload === undefined ? undefined : parsePayload(opts.payload);
      const engine = c.open(true, false);
      return run(c, async () => {
        const { woke } = await engine.signal(id, name, payload);
        c.print(
          woke
            ? `signal ${name} sent; run ${id} was waiting for it and is due now`
            : `signal ${name} kept for run ${id}; its wait of that name takes it when it gets there`,
          { runId: id, name, woke },
        );
        return 0;
      });
    });

  root
    .command('cancel')
    .description('stop a run (at its next milestone if it is running) and leave it cancelled')
    .argument('<run-id>')
    .option('--rollback', 'run its compensations first')
    .action(async (id: string, opts: { rollback?: boolean }, command: Command) => {
      const c = cli(command);
      const engine = c.open(true);
      return run(c, async () =>
        c.report(await engine.cancel(id, { rollback: opts.rollback === true }), [
          RunStatus.cancelled,
        ]),
      );
    });

  const dlq = root.command('dlq').description('the dead-letter queue: runs that could not finish');
  dlq
    .command('ls')
    .description('dead-lettered runs, newest first')
    .option('--all', 'include dropped entries')
    .action(async (opts: { all?: boolean }, command: Command) => {
      const c = cli(command);
      const engine = c.open(true, false);
      return run(c, async () => {
        const letters = await engine.deadLetters({ includeDropped: opts.all === true });
        c.print(formatDeadLetters(letters), letters);
        return 0;
      });
    });
  dlq
    .command('show')
    .description('a dead letter: the step, the reason, the error chain and the attempts')
    .argument('<run-id>')
    .action(async (id: string, _opts: object, command: Command) => {
      const c = cli(command);
      const engine = c.open(true, false);
      return run(c, async () => {
        const letter = await engine.deadLetter(id);
        c.print(formatDeadLetter(letter), letter);
        return 0;
      });
    });
  dlq
    .command('retry')
    .description('queue a dead-lettered run again; it continues from its last checkpoint')
    .argument('[run-id]')
    .option('--all', 'every dead-lettered run')
    .action(async (id: string | undefined, opts: { all?: boolean }, command: Command) => {
      const c = cli(command);
      if (!id && !opts.all)
        throw new InputError('Give a run id, or --all.', { hint: 'List them with `keel dlq ls`.' });
      if (id && opts.all) throw new InputError('Give a run id or --all, not both.');
      const engine = c.open(true, false);
      return run(c, async () => {
        const ids = id ? [id] : (await engine.deadLetters()).map((d) => d.runId);
        for (const runId of ids) await engine.retryDeadLetter(runId);
        c.print(
          ids.length
            ? `queued again: ${ids.join(', ')}; \`keel worker\` carries them on`
            : 'the dead-letter queue is empty',
          { retried: ids },
        );
        return 0;
      });
    });
  dlq
    .command('drop')
    .description('remove a run from the dead-letter queue (the run and its record stay)')
    .argument('<run-id>')
    .action(async (id: string, _opts: object, command: Command) => {
      const c = cli(command);
      const engine = c.open(true, false);
      return run(c, async () => {
        await engine.dropDeadLetter(id);
        c.print(`dropped ${id} from the dead-letter queue`, { dropped: id });
        return 0;
      });
    });

  registerDoctor(root, (code) => (exitCode = code));

  root
    .command('keygen')
    .description('print a new random key for KEEL_SECRET_KEY, which encrypts secret(...) values')
    .action((_opts: object, command: Command) => {
      const key = newSecretKey();
      cli(command).print(key, { key });
    });

  return root;
}

let exitCode = 0;

async function run(cli: Cli, work: () => Promise<number>): Promise<void> {
  try {
    exitCode = await work();
  } finally {
    await cli.close();
  }
}

async function main(argv: string[]): Promise<number> {
  const json = argv.includes('--json');
  try {
    await program().parseAsync(argv);
    return exitCode;
  } catch (error) {
    if (error instanceof CommanderError) {
      return error.exitCode === 0 ? 0 : 2;
    }
    const data = serializeError(error);
    if (json)
      process.stdout.write(
        `${JSON.stringify({ error: { ...data, stack: undefined } }, null, 2)}\n`,
      );
    process.stderr.write(`keel: ${error instanceof Error ? error.message : String(error)}\n`);
    if (!isKeelError(error) && error instanceof Error && process.env.KEEL_DEBUG)
      process.stderr.write(`${error.stack}\n`);
    return isInputError(error) || (isKeelError(error) && USAGE_CODES.includes(error.code)) ? 2 : 1;
  }
}

process.exitCode = await main(process.argv);
