/**
 * The workflows the torture harness kills: each one deterministic in its input, so that a run that
 * was killed any number of times must end in exactly the state of one that never was.
 *
 * Effects go to the harness's sink over HTTP (`TORTURE_SINK`), which honours keys; LLM calls go to
 * its fake OpenAI server through the router. Every request carries the run's input id, so that the
 * harness can tell whose effect or call it is.
 */
import { END, TerminalError, workflow, type LlmCall } from 'keel';

export type Mix = {
  id: string;
  n: number;
  log: string[];
  total: number;
  squares: number[];
  answers: string[];
  receipts: string[];
  at?: Date;
  tally?: Map<string, bigint>;
  lap?: number;
  signal?: { n: number; from: string };
  timedOut?: boolean;
  /** For `t-rollback`: `flaky` compensations succeed on their third call, `stuck` ones never. */
  mode?: 'flaky' | 'stuck';
};

type Receipt = { receipt: string };

function sinkUrl(path: string): string {
  const base = process.env.TORTURE_SINK;
  if (!base) throw new Error('TORTURE_SINK is not set');
  return `${base}${path}`;
}

async function post(path: string, body: object): Promise<Receipt> {
  const res = await fetch(sinkUrl(path), {
    method: 'POST',
    headers: { 'content-type': 'application/json' },
    body: JSON.stringify(body),
  });
  const text = await res.text();
  if (!res.ok) throw new Error(`sink ${path} answered ${res.status}: ${text}`);
  return JSON.parse(text) as Receipt;
}

/** Applies an effect at the sink; the sink keeps the first application of each key. */
export function apply(id: string, key: string, value: unknown): Promise<Receipt> {
  return post('/apply', { id, key, value });
}

/** Undoes an effect at the sink, which fails the first two calls for each key. */
function undo(key: string, compensationKey: string, effect: string): Promise<Receipt> {
  const id = key.slice(key.indexOf(':') + 1);
  return post('/compensate', { id, key, compensationKey, effect });
}

const ask = async (state: { id: string }, ctx: { llm: LlmCall }, where: string) => {
  const res = await ctx.llm({
    messages: [{ role: 'user', content: `${state.id}|${where}` }],
    maxTokens: 16,
  });
  return res.text;
};

/** Steps, an effect step, `ctx.checkpoint()` in a loop, LLM calls and effects inside a step. */
export const linear = workflow<Mix>('t-linear', { version: 1 })
  .step('prepare', (state) => {
    state.log.push('prepare');
    state.total = state.n;
    state.at = new Date(Date.UTC(2026, 0, state.n));
  })
  .step('gather', async (state, ctx) => {
    for (let i = state.squares.length; i < state.n; i++) {
      state.squares.push(i * i);
      state.total += i;
      if (i % 2 === 1) await ctx.checkpoint();
    }
    state.log.push('gather');
  })
  .step('ask', async (state, ctx) => {
    for (let i = 0; i < 2; i++) state.answers.push(await ask(state, ctx, `ask:${i}`));
    state.log.push('ask');
  })
  .effect('publish', {
    key: (state) => `publish:${state.id}`,
    run: (state, { key }) => apply(state.id, key, state.total),
    save: (state, result) => {
      state.receipts.push(result.receipt);
    },
  })
  .step('notify', async (state, ctx) => {
    // Each ctx.effect commits the state so far, and a crash after it runs the step again from
    // there: what comes before an effect must be safe to do twice.
    if (!state.log.includes('notify:before')) state.log.push('notify:before');
    const receipts: string[] = [];
    for (let i = 0; i < 2; i++) {
      const got = await ctx.effect(`notify-${i}`, {
        key: `notify:${state.id}:${i}`,
        run: (s, { key }) => apply(s.id, key, s.squares.length + i),
      });
      receipts.push(got.receipt);
    }
    state.receipts.push(...receipts);
    state.tally = new Map([['squares', BigInt(state.squares.length) ** 20n]]);
    state.log.push('notify:after');
  });

/** A routed cycle: `lap` runs `n` times, with an effect on odd laps and an LLM call on the first. */
export const cycle = workflow<Mix>('t-cycle', { version: 1 })
  .step('start', (state) => {
    state.lap = 0;
    state.log.push('start');
  })
  .step('lap', async (state, ctx) => {
    const lap = (state.lap ?? 0) + 1;
    const answer = lap === 1 ? await ask(state, ctx, 'lap') : undefined;
    const got =
      lap % 2 === 1
        ? await ctx.effect('tick', {
            key: `tick:${state.id}:${lap}`,
            run: (s, { key }) => apply(s.id, key, lap),
          })
        : undefined;
    // Changed only after the effect, which commits the state so far.
    state.lap = lap;
    state.log.push(`lap ${lap}`);
    if (answer !== undefined) state.answers.push(answer);
    if (got) state.receipts.push(got.receipt);
  })
  .route('lap', (state) => ((state.lap ?? 0) < state.n ? 'lap' : 'finish'), ['lap', 'finish'])
  .step('finish', (state) => {
    state.total = state.lap ?? 0;
    state.log.push('finish');
  })
  .route('finish', () => END, [END]);

/** A durable sleep, a signal the harness sends, and a wait that times out and is caught. */
export const waits = workflow<Mix>('t-wait', { version: 1 })
  .step('before', (state) => {
    state.log.push('before');
  })
  .step('nap', async (state, ctx) => {
    await ctx.sleep('nap', '40ms');
    state.log.push('woke');
  })
  .step('approve', async (state, ctx) => {
    const signal = await ctx.waitFor<{ n: number; from: string }>('go', { timeout: '1h' });
    let timedOut = false;
    try {
      await ctx.waitFor('never', { timeout: '60ms' });
    } catch (error) {
      if ((error as { code?: string }).code !== 'WAIT_TIMEOUT') throw error;
      timedOut = true;
    }
    state.signal = signal;
    state.timedOut = timedOut;
    state.log.push('approved');
  })
  .effect('record', {
    key: (state) => `record:${state.id}`,
    run: (state, { key }) => apply(state.id, key, state.signal?.n ?? -1),
    save: (state, result) => {
      state.receipts.push(result.receipt);
    },
  });

/**
 * Two effects, then a step that fails for good; the workflow rolls itself back. `charge`'s
 * compensation fails twice before it succeeds; `reserve`'s does too in `flaky` mode and never
 * succeeds in `stuck` mode, which leaves the run `compensation_failed` with `reserve` applied.
 */
export const rollback = workflow<Mix>('t-rollback', { version: 1, rollbackOnFailure: true })
  .effect('reserve', {
    key: (state) => `reserve:${state.id}`,
    run: (state, { key }) => apply(state.id, key, state.n),
    compensate: async (_result, info) => {
      await undo(info.key, info.compensationKey, 'reserve');
    },
    compensateRetry: { attempts: 3, backoff: '5ms', maxBackoff: '20ms' },
  })
  .step('work', async (state, ctx) => {
    const got = await ctx.effect('charge', {
      key: `charge:${state.id}`,
      run: (s, { key }) => apply(s.id, key, s.n * 100),
    });
    state.receipts.push(got.receipt);
    state.log.push('charged');
  })
  .step('explode', (state) => {
    throw new TerminalError(`run ${state.id} fails here on purpose`);
  })
  .compensation<Receipt>(
    'charge',
    async (_result, info) => {
      await undo(info.key, info.compensationKey, 'charge');
    },
    { compensateRetry: { attempts: 3, backoff: '5ms', maxBackoff: '20ms' } },
  );

export const all = { linear, cycle, waits, rollback };
