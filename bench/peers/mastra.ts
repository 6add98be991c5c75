/**
 * Mastra peer for the linear-workflow benchmark: `steps` steps chained with `.then()`, run by the
 * default execution engine, which upserts the run's whole snapshot (one row per run) into
 * LibSQLStore twice per step: when the step starts and when it ends.
 *
 * The state lives in Mastra's workflow state (`stateSchema` / `setState`) rather than in step
 * input/output: the snapshot keeps every step's input and output forever, so carrying the blob
 * through input/output would store it twice per step and grow each write with the run length.
 * Workflow state is held once per snapshot, which is the fair reading of "one small field changes".
 */
import { Mastra } from '@mastra/core';
import { createStep, createWorkflow } from '@mastra/core/workflows';
import { LibSQLStore } from '@mastra/libsql';
import { z } from 'zod';
import type { LinearOptions, PreparedRun } from '../peers.ts';

// Mastra's usage telemetry would otherwise be allowed to post to its vendor; a benchmark must not.
process.env['MASTRA_TELEMETRY_DISABLED'] = '1';

const WORKFLOW_ID = 'linear';
const SNAPSHOT_TABLE = 'mastra_workflow_snapshot';

const stateSchema = z.object({ i: z.number(), note: z.string(), blob: z.string() });
type LinearState = z.infer<typeof stateSchema>;
const empty = z.object({});

function makeStep(k: number, onStep: () => void) {
  return createStep({
    id: `s${k}`,
    inputSchema: empty,
    outputSchema: empty,
    stateSchema,
    execute: async ({ state, setState }) => {
      onStep();
      const i = state.i + 1;
      // setState replaces the whole state, so the blob is passed through unchanged.
      await setState({ ...state, i, note: `step ${i}` });
      return {};
    },
  });
}

function buildWorkflow(steps: number, onStep: () => void) {
  if (!Number.isInteger(steps) || steps < 1) throw new Error(`steps must be >= 1, got ${steps}`);
  const workflow = createWorkflow({
    id: WORKFLOW_ID,
    inputSchema: empty,
    outputSchema: empty,
    stateSchema,
  });
  // then() appends to the workflow in place, so the loop needs no reassignment.
  for (let k = 0; k < steps; k += 1) workflow.then(makeStep(k, onStep));
  return workflow.commit();
}

type Row = Record<string, unknown>;
type Client = {
  execute(sql: string | { sql: string; args: string[] }): Promise<{ rows: ArrayLike<Row> }>;
};

/** LibSQLStore keeps its libsql client private; the benchmark needs it for pragmas and checks. */
function clientOf(store: LibSQLStore): Client {
  const client = (store as unknown as { client?: Client }).client;
  if (!client) throw new Error('LibSQLStore no longer exposes its client');
  return client;
}

async function pragma(client: Client, name: string): Promise<string> {
  const result = await client.execute(`PRAGMA ${name}`);
  const row = result.rows[0];
  return row ? String(Object.values(row)[0]) : '';
}

/** libsql's default `concurrency`: the most connections its local client pool will open. */
const POOL_SIZE = 20;

/**
 * Sets `synchronous` on every connection the libsql client can use and checks it took. The local
 * client pools up to POOL_SIZE connections and the pragma is per connection; LibSQLStore only sets
 * it on whichever connections happened to serve its own pragma calls. Calls issued in the same
 * tick each borrow a different connection, so POOL_SIZE concurrent calls reach all of them.
 */
async function setSynchronous(client: Client, level: LinearOptions['synchronous']): Promise<void> {
  const everyConnection = (sql: string) =>
    Promise.all(Array.from({ length: POOL_SIZE }, () => client.execute(sql)));
  await everyConnection(`PRAGMA synchronous = ${level}`);
  const want = level === 'FULL' ? '2' : '1';
  for (const result of await everyConnection('PRAGMA synchronous')) {
    const got = String(Object.values(result.rows[0] ?? {})[0]);
    if (got !== want) throw new Error(`libsql connection has synchronous=${got}, want ${want}`);
  }
}

/** Status recorded in the run's persisted snapshot, or undefined when nothing was persisted. */
async function persistedStatus(client: Client, runId: string): Promise<unknown> {
  const result = await client.execute({
    sql: `SELECT json_extract(snapshot, '$.status') AS status FROM ${SNAPSHOT_TABLE}
          WHERE workflow_name = ? AND run_id = ?`,
    args: [WORKFLOW_ID, runId],
  });
  return result.rows[0]?.['status'];
}

export async function prepareLinear(options: LinearOptions): Promise<PreparedRun> {
  let executed = 0;
  const storage = new LibSQLStore({ id: 'bench-peer', url: `file:${options.file}` });
  const mastra = new Mastra({
    workflows: { [WORKFLOW_ID]: buildWorkflow(options.steps, () => (executed += 1)) },
    storage,
    logger: false,
  });
  // Table creation and LibSQLStore's own pragmas (WAL, synchronous=NORMAL) happen here, untimed.
  await storage.init();
  const client = clientOf(storage);
  await setSynchronous(client, options.synchronous);
  if ((await pragma(client, 'journal_mode')) !== 'wal')
    throw new Error('LibSQLStore is not in WAL');
  const workflow = mastra.getWorkflow(WORKFLOW_ID);
  const blob = 'x'.repeat(options.stateBytes);

  return {
    async run() {
      executed = 0;
      const run = await workflow.createRun();
      const result = await run.start({
        inputData: {},
        initialState: { i: 0, note: '', blob } satisfies LinearState,
        outputOptions: { includeState: true },
      });
      if (result.status !== 'success') throw new Error(`Mastra run ended ${result.status}`);
      const final = result.state;
      if (final?.i !== options.steps || executed !== options.steps) {
        throw new Error(`Mastra ran ${executed} steps, final i=${final?.i}; want ${options.steps}`);
      }
      if (final.blob.length !== options.stateBytes) throw new Error('Mastra lost the blob');
      // Persistence can be switched off in Mastra; prove this run's snapshot reached the database.
      const persisted = await persistedStatus(client, run.runId);
      if (persisted !== 'success')
        throw new Error(`persisted snapshot status: ${String(persisted)}`);
      return { stepsRun: executed };
    },
    async close() {
      await storage.close();
    },
  };
}

export const describe = (options: LinearOptions): string =>
  `Mastra LibSQLStore (libsql), WAL, synchronous=${options.synchronous}, workflow state, snapshot upserted at each step start and end`;
