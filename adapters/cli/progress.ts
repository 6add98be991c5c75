/**
 * Run progress for the terminal: on a TTY, one status line redrawn in place (the step being run, steps
 * done, elapsed time); otherwise plain log lines, one per event, for CI logs and files.
 */
import type { RunEvent } from '../../engine/deps.ts';

export interface Progress {
  onEvent(event: RunEvent): void;
  /** Clears the live line so that another line can be written. */
  clear(): void;
  stop(): void;
}

const FRAMES = ['⠋', '⠙', '⠹', '⠸', '⠼', '⠴', '⠦', '⠧', '⠇', '⠏'];

export function createProgress(stream: NodeJS.WriteStream, enabled: boolean): Progress {
  if (!enabled) return { onEvent() {}, clear() {}, stop() {} };
  return stream.isTTY ? liveProgress(stream) : lineProgress(stream);
}

function lineProgress(stream: NodeJS.WriteStream): Progress {
  const started = new Map<string, number>();
  const write = (text: string) => stream.write(`${new Date().toISOString()} ${text}\n`);
  return {
    onEvent(event) {
      switch (event.type) {
        case 'run-started':
        case 'run-resumed':
          write(
            `run ${event.runId} ${event.type === 'run-started' ? 'started' : 'resumed'} (${event.workflow}) at ${event.cursor ?? 'end'}`,
          );
          break;
        case 'step-started':
          started.set(event.step, Date.now());
          write(
            `step ${event.index} ${event.step} started${event.attempt > 1 ? ` (attempt ${event.attempt})` : ''}`,
          );
          break;
        case 'step-completed':
          write(
            `step ${event.index} ${event.step} completed in ${Date.now() - (started.get(event.step) ?? Date.now())} ms`,
          );
          break;
        case 'step-retrying':
          write(
            `step ${event.step} failed (attempt ${event.attempt}), retrying in ${event.delayMs} ms: ${event.error}`,
          );
          break;
        case 'effect-applied':
          write(`effect ${event.effect} applied (key ${event.key})`);
          break;
        case 'effect-reused':
          write(
            `effect ${event.effect} already applied (key ${event.key}); recorded result reused`,
          );
          break;
        case 'compensated':
          write(`effect ${event.effect} compensated (key ${event.key})`);
          break;
        case 'run-ended':
          write(`run ${event.runId} ${event.status}`);
          break;
      }
    },
    clear() {},
    stop() {},
  };
}

function liveProgress(stream: NodeJS.WriteStream): Progress {
  const begun = Date.now();
  let frame = 0;
  let step = '';
  let done = 0;
  let note = '';
  const draw = () => {
    const elapsed = ((Date.now() - begun) / 1000).toFixed(1);
    const line = `${FRAMES[frame++ % FRAMES.length]} ${step ? `running ${step}` : 'starting'} · ${done} step(s) done · ${elapsed}s${note ? ` · ${note}` : ''}`;
    stream.write(`\r\x1b[2K${line.slice(0, Math.max(20, (stream.columns ?? 100) - 1))}`);
  };
  const timer = setInterval(draw, 100);
  timer.unref();
  return {
    onEvent(event) {
      if (event.type === 'step-started') {
        step = event.step;
        note = event.attempt > 1 ? `attempt ${event.attempt}` : '';
      } else if (event.type === 'step-completed') {
        done += 1;
      } else if (event.type === 'step-retrying') {
        note = `retrying in ${event.delayMs} ms`;
      } else if (event.type === 'effect-applied') {
        note = `applied ${event.effect}`;
      }
      draw();
    },
    clear() {
      stream.write('\r\x1b[2K');
    },
    stop() {
      clearInterval(timer);
      stream.write('\r\x1b[2K');
    },
  };
}
