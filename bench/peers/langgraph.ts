/**
 * LangGraph peer for the linear-workflow benchmark: a StateGraph of `steps` nodes chained by
 * edges, checkpointed by the official SqliteSaver (better-sqlite3) after every superstep.
 */
import { Annotation, END, START, StateGraph } from '@langchain/langgraph';
import { SqliteSaver } from '@langchain/langgraph-checkpoint-sqlite';
import type { LinearOptions, PreparedRun } from '../peers.ts';

/** Every channel keeps only the latest value written to it, so a node's update replaces fields. */
function replace<T>(_previous: T, next: T): T {
  return next;
}

const LinearState = Annotation.Root({
  i: Annotation<number>({ reducer: replace, default: () => 0 }),
  note: Annotation<string>({ reducer: replace, default: () => '' }),
  blob: Annotation<string>({ reducer: replace, default: () => '' }),
});

type State = typeof LinearState.State;
type NodeName = `s${number}`;

function nodeName(k: number): NodeName {
  return `s${k}`;
}

/** Builds the uncompiled chain s0 -> s1 -> ... ; `onStep` counts node executions. */
function buildGraph(steps: number, onStep: () => void) {
  if (!Number.isInteger(steps) || steps < 1) throw new Error(`steps must be >= 1, got ${steps}`);
  // The node only returns the two fields it changes; `blob` stays in its channel untouched.
  const step = (state: State): Partial<State> => {
    onStep();
    const i = state.i + 1;
    return { i, note: `step ${i}` };
  };
  const nodes: [NodeName, typeof step][] = [];
  for (let k = 0; k < steps; k += 1) nodes.push([nodeName(k), step]);

  const graph = new StateGraph(LinearState).addNode(nodes);
  graph.addEdge(START, nodeName(0));
  for (let k = 1; k < steps; k += 1) graph.addEdge(nodeName(k - 1), nodeName(k));
  graph.addEdge(nodeName(steps - 1), END);
  return graph;
}

/** Opens the saver's database with our pragmas and creates its tables before timing starts. */
async function openSaver(options: LinearOptions): Promise<SqliteSaver> {
  const saver = SqliteSaver.fromConnString(options.file);
  // The saver switches to WAL itself on first use; setting it here too keeps this explicit.
  saver.db.pragma('journal_mode = WAL');
  saver.db.pragma(`synchronous = ${options.synchronous}`);
  // getTuple runs the saver's lazy setup (CREATE TABLE ...), so run() measures steps only.
  await saver.getTuple({ configurable: { thread_id: 'warm-up' } });
  const mode = saver.db.pragma('journal_mode', { simple: true });
  if (String(mode).toLowerCase() !== 'wal') throw new Error(`expected WAL, got ${String(mode)}`);
  return saver;
}

export async function prepareLinear(options: LinearOptions): Promise<PreparedRun> {
  let executed = 0;
  const saver = await openSaver(options);
  const app = buildGraph(options.steps, () => {
    executed += 1;
  }).compile({ checkpointer: saver });
  const blob = 'x'.repeat(options.stateBytes);
  let runs = 0;

  return {
    async run() {
      executed = 0;
      runs += 1;
      const final = await app.invoke(
        { i: 0, note: '', blob },
        {
          configurable: { thread_id: `linear-${runs}` },
          recursionLimit: options.steps + 10,
          // Write each checkpoint before the next superstep starts, like a durable engine must.
          durability: 'sync',
        },
      );
      if (final.i !== options.steps || executed !== options.steps) {
        throw new Error(
          `LangGraph ran ${executed} steps, final i=${final.i}; want ${options.steps}`,
        );
      }
      if (final.blob.length !== options.stateBytes) throw new Error('LangGraph lost the blob');
      return { stepsRun: executed };
    },
    async close() {
      saver.db.close();
    },
  };
}

export const describe = (options: LinearOptions): string =>
  `LangGraph SqliteSaver (better-sqlite3), WAL, synchronous=${options.synchronous}, durability=sync`;
