/**
 * A logger that writes plain lines to a stream: `LEVEL message key=value …`. Used by the CLI for
 * `ctx.log` and the engine's own warnings; `before` lets a live progress line get out of the way.
 */
import { InputError } from '../engine/errors.ts';
import type { LogFields, Logger } from '../engine/logger.ts';

const LEVELS = { debug: 10, info: 20, warn: 30, error: 40 } as const;
export type LogLevel = keyof typeof LEVELS;

export type ConsoleLoggerOptions = {
  level?: LogLevel;
  stream?: NodeJS.WritableStream;
  /** Called before each line is written (e.g. to clear a status line). */
  before?: () => void;
};

export function consoleLogger(options: ConsoleLoggerOptions = {}, bound: LogFields = {}): Logger {
  const threshold = LEVELS[options.level ?? 'info'];
  const stream = options.stream ?? process.stderr;
  const write = (level: LogLevel, message: string, fields: LogFields = {}) => {
    if (LEVELS[level] < threshold) return;
    const all = { ...bound, ...fields };
    const extra = Object.entries(all)
      .filter(([, v]) => v !== undefined)
      .map(([k, v]) => `${k}=${typeof v === 'string' && !/\s/.test(v) ? v : safeJson(v)}`)
      .join(' ');
    options.before?.();
    stream.write(`${level.toUpperCase().padEnd(5)} ${message}${extra ? ` ${extra}` : ''}\n`);
  };
  return {
    debug: (m, f) => write('debug', m, f),
    info: (m, f) => write('info', m, f),
    warn: (m, f) => write('warn', m, f),
    error: (m, f) => write('error', m, f),
    child: (fields) => consoleLogger(options, { ...bound, ...fields }),
  };
}

function safeJson(value: unknown): string {
  try {
    return (
      JSON.stringify(value, (_k, v: unknown) => (typeof v === 'bigint' ? `${v}n` : v)) ??
      'undefined'
    );
  } catch {
    return '[unprintable]';
  }
}

/** `KEEL_LOG`'s value; anything but a known level is refused rather than ignored. */
export function parseLogLevel(value: string | undefined): LogLevel {
  if (value === undefined || value === '') return 'info';
  if (value in LEVELS) return value as LogLevel;
  throw new InputError(`KEEL_LOG=${value} is not a log level.`, {
    hint: `Use one of ${Object.keys(LEVELS).join(', ')}, or unset it (info).`,
  });
}
