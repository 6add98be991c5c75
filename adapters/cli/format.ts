/** Human-readable output of runs: the `show` timeline and the `ls` table. */
import { toDisplayJson } from '../../engine/codec.ts';
import { errorSummary, type SerializedError } from '../../engine/errors.ts';
import type { DeadLetterView } from '../../engine/engine.ts';
import type { ResumePlan, RunSummary, RunView } from '../../engine/views.ts';

const time = (ms: number | null) =>
  ms === null ? '-' : new Date(ms).toISOString().replace('T', ' ').slice(0, 23);
const duration = (ms: number | null) => {
  if (ms === null) return '-';
  if (ms < 1_000) return `${ms} ms`;
  if (ms < 60_000) return `${(ms / 1000).toFixed(2)} s`;
  return `${Math.floor(ms / 60_000)} min ${Math.round((ms % 60_000) / 1000)} s`;
};

export function table(header: string[], rows: string[][]): string {
  const widths = header.map((h, i) => Math.max(h.length, ...rows.map((r) => (r[i] ?? '').length)));
  const line = (cells: string[]) =>
    cells
      .map((c, i) => c.padEnd(widths[i]!))
      .join('  ')
      .trimEnd();
  return [line(header), ...rows.map(line)].join('\n');
}

export function compact(value: unknown, max = 80): string {
  const text = JSON.stringify(toDisplayJson(value)) ?? 'undefined';
  return text.length > max ? `${text.slice(0, max - 1)}…` : text;
}

export function formatRun(run: RunView): string {
  const out: string[] = [];
  out.push(`run       ${run.id}`);
  out.push(`workflow  ${run.workflow} v${run.version}${run.module ? `  (${run.module})` : ''}`);
  out.push(`status    ${run.status}${run.live ? ' (a live process holds it)' : ''}`);
  out.push(
    `started   ${time(run.createdAt)}${run.endedAt ? `   ended ${time(run.endedAt)} (${duration(run.endedAt - run.createdAt)})` : ''}`,
  );
  if (run.error) out.push(`error     ${errorLine(run.error)}`);
  out.push('', 'steps');
  out.push(
    indent(
      table(
        ['#', 'step', 'status', 'attempts', 'duration', 'next', 'error'],
        run.steps.map((s) => [
          String(s.index),
          s.name,
          s.status,
          String(s.attempts),
          duration(s.durationMs),
          s.next ?? (s.status === 'completed' ? 'end' : '-'),
          s.error ? errorSummary(s.error).slice(0, 60) : '',
        ]),
      ),
    ),
  );
  if (run.effects.length > 0) {
    out.push('', 'effects');
    out.push(
      indent(
        table(
          ['effect', 'key', 'status', 'attempts', 'step', 'result'],
          run.effects.map((e) => [
            e.name,
            e.key,
            e.status +
              (e.compensationAttempts
                ? ` (${e.compensationAttempts} compensation attempt(s))`
                : ''),
            String(e.attempts),
            e.step,
            e.error ? errorSummary(e.error).slice(0, 60) : compact(e.result, 60),
          ]),
        ),
      ),
    );
  }
  if (run.llmCalls.length > 0) {
    out.push('', 'llm calls');
    out.push(
      indent(
        table(
          [
            '#',
            'step',
            'tier',
            'model',
            'attempts',
            'failovers',
            'tokens in/out',
            'latency',
            'cost',
            'note',
          ],
          run.llmCalls.map((c) => [
            `${c.stepIndex}.${c.position}`,
            c.step,
            c.tier ?? '-',
            c.model ?? '-',
            attemptsSummary(c.attempts),
            String(c.failovers),
            `${c.inputTokens}/${c.outputTokens}`,
            duration(c.latencyMs),
            c.costUsd === null ? '-' : `$${c.costUsd.toFixed(4)}`,
            [
              c.status === 'failed' && c.error ? errorSummary(c.error).slice(0, 50) : '',
              c.degraded ? 'degraded' : '',
              c.replayed ? `replayed x${c.replays}` : '',
            ]
              .filter(Boolean)
              .join(', '),
          ]),
        ),
      ),
    );
    const u = run.llmUsage;
    out.push(
      indent(
        `total: ${u.calls} call(s), ${u.inputTokens} input and ${u.outputTokens} output tokens` +
          (u.costUsd === null ? '' : `, $${u.costUsd.toFixed(4)}`),
      ),
    );
  }
  out.push('', `state     ${compact(run.state, 200)}`);
  return out.join('\n');
}

/** `primary:server(500) > secondary:ok`: each attempt's tier and how it ended. */
function attemptsSummary(attempts: RunView['llmCalls'][number]['attempts']): string {
  return attempts
    .map((a) => {
      if (a.cancelled) return `${a.tier}:cancelled`;
      if (a.class === null) return `${a.tier}:ok`;
      return `${a.tier}:${a.class}${a.status === null ? '' : `(${a.status})`}`;
    })
    .join(' > ');
}

export function formatList(runs: RunSummary[]): string {
  if (runs.length === 0) return 'no runs';
  return table(
    ['id', 'workflow', 'status', 'steps', 'at', 'updated'],
    runs.map((r) => [
      r.id,
      `${r.workflow} v${r.version}`,
      r.status === 'running' && !r.live ? 'running (interrupted)' : r.status,
      String(r.stepCount),
      r.cursor ?? '-',
      time(r.updatedAt),
    ]),
  );
}

export function formatPlan(plan: ResumePlan): string {
  const keys = (list: { name: string; key: string }[]) =>
    list.length ? list.map((e) => `${e.name} (key ${e.key})`).join(', ') : 'none';
  return [
    `run ${plan.runId} (${plan.workflow}) is ${plan.status}`,
    plan.resumable ? 'resume would proceed' : `resume would refuse: ${plan.reason}`,
    `steps done:                ${plan.completedSteps.join(' → ') || 'none'}`,
    `restarts at:               ${plan.restartAt ?? 'nothing left to run'}`,
    `effect results reused:     ${keys(plan.reused)}`,
    `effects run again (same key): ${keys(plan.rerun)}`,
    `effects reconciled first:  ${keys(plan.reconcile)}`,
    `effects of unknown outcome: ${keys(plan.unknown)}`,
  ].join('\n');
}

export function errorLine(error: SerializedError): string {
  return `${error.message.split('\n')[0] ?? ''}${error.step ? ` (step ${String(error.step)})` : ''}`;
}

function indent(text: string): string {
  return text
    .split('\n')
    .map((l) => `  ${l}`)
    .join('\n');
}

const REASONS: Record<DeadLetterView['reason'], string> = {
  attempts: "the step's attempts are spent",
  wait_limit: 'it waited longer than its limit',
  not_retryable: 'its error cannot be cured by a retry',
};

export function formatDeadLetters(letters: DeadLetterView[]): string {
  if (letters.length === 0) return 'the dead-letter queue is empty';
  return table(
    ['run', 'workflow', 'step', 'reason', 'since', 'error'],
    letters.map((d) => [
      d.runId,
      d.workflow,
      d.step ?? '-',
      d.reason,
      new Date(d.createdAt).toISOString(),
      errorSummary(d.error).slice(0, 70),
    ]),
  );
}

export function formatDeadLetter(d: DeadLetterView): string {
  const lines = [
    `run       ${d.runId}`,
    `workflow  ${d.workflow}`,
    `step      ${d.step ?? '-'}`,
    `reason    ${d.reason}: ${REASONS[d.reason]}`,
    `since     ${new Date(d.createdAt).toISOString()}${d.droppedAt ? ` (dropped ${new Date(d.droppedAt).toISOString()})` : ''}`,
    '',
    'error',
  ];
  let error: SerializedError | undefined = d.error;
  for (let depth = 0; error && depth < 8; depth++) {
    lines.push(
      `${'  '.repeat(depth + 1)}${error.code ? `[${error.code}] ` : ''}${error.message.split('\n')[0]}`,
    );
    error = error.cause;
  }
  lines.push('', 'history');
  for (const h of d.history as {
    at: number;
    step: string;
    error: string;
    waitMs?: number;
    attempt?: number;
  }[]) {
    const what =
      h.waitMs !== undefined ? `parked ${h.waitMs} ms` : `attempt ${h.attempt ?? '?'} failed`;
    lines.push(`  ${new Date(h.at).toISOString()}  ${h.step}  ${what}: ${h.error}`);
  }
  lines.push(
    '',
    `retry it with \`keel dlq retry ${d.runId}\`; it continues from its last checkpoint`,
  );
  return lines.join('\n');
}
