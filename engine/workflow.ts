/**
 * The workflow builder: a typed graph of steps, effects and routes.
 *
 * A builder call returns a new workflow; nothing is shared between the old value and the new one. The
 * type parameters accumulate the declared step names, so that `route` targets are checked when the
 * workflow is used: a target that no step declares leaves the workflow unusable by `engine.start`.
 */
import type { Draft } from 'immer';
import { DefinitionError } from './errors.ts';
import type { LlmCall } from './llm/journal.ts';
import type { Logger } from './logger.ts';
import { toMs, type Duration } from './time.ts';

const LONE_SURROGATE = /[\uD800-\uDBFF](?![\uDC00-\uDFFF])|(?<![\uD800-\uDBFF])[\uDC00-\uDFFF]/;

/** The route target that ends the run. */
export const END = '__end__';
export type END = typeof END;

export type RetryOptions = {
  /** Total attempts, the first included (default 1 for steps, 3 for effects and compensations). */
  attempts?: number;
  /** First backoff ceiling; later ones double, with full jitter (default `"200ms"`). */
  backoff?: Duration;
  /** Largest backoff ceiling (default `"30s"`). */
  maxBackoff?: Duration;
};

export type StepOptions = { retry?: RetryOptions };

export type EffectInfo = {
  /** The idempotency key, as the workflow computed it; pass it to the outside system. */
  key: string;
  runId: string;
  attempt: number;
  signal: AbortSignal;
};

export type CompensationInfo = {
  /** The effect's own key. */
  key: string;
  /** A key for the compensation itself, stable across retries and processes. */
  compensationKey: string;
  runId: string;
  attempt: number;
};

export type Reconciled<R> = { applied: true; result: R } | { applied: false };

type EffectHandlers<S, R> = {
  /**
   * Applies the effect. Called at most once per key unless the process dies between the call and
   * the record of its result; then it is called again with the same key (see `idempotent`).
   */
  run: (state: S, info: EffectInfo) => Promise<R> | R;
  /** Undoes the effect during rollback, given the recorded result. Retried with backoff. */
  compensate?: (result: R, info: CompensationInfo) => Promise<void> | void;
  /**
   * Asks the outside system whether the effect with this key was applied. Resume calls it before
   * running again an effect whose outcome was not recorded; rollback calls it for the same reason.
   */
  reconcile?: (key: string) => Promise<Reconciled<R>> | Reconciled<R>;
  /**
   * Whether the outside system honours the key (default true): an effect whose outcome was not
   * recorded is then run again with the same key. When false and there is no `reconcile`, such an
   * effect is reported as outcome unknown and the run stops instead.
   */
  idempotent?: boolean;
  retry?: RetryOptions;
  compensateRetry?: RetryOptions;
};

/** An effect step: its key is computed from the state when the step is reached. */
export type EffectDefinition<S, R> = EffectHandlers<S, R> & {
  key: (state: S) => string;
  /**
   * Copies what later steps need from the result into the state. It runs in the same milestone that
   * records the result (and again, with the recorded result, if that milestone is replayed).
   */
  save?: (state: Draft<S>, result: R) => void;
};

/** An effect started from inside a step with `ctx.effect`. */
export type InlineEffect<S, R> = EffectHandlers<S, R> & { key: string | ((state: S) => string) };

export interface StepContext<S = unknown> {
  readonly runId: string;
  readonly step: string;
  /** 1 for the first attempt of this step execution, 2 for its first retry, and so on. */
  readonly attempt: number;
  /** Aborted when the run loses its lease or the process is shutting down. */
  readonly signal: AbortSignal;
  readonly log: Logger;
  /**
   * Commits the state as it stands. After a crash, the step runs again from its start, with the state
   * of its last checkpoint, so a loop that records its progress in the state resumes where it was.
   * Re-read objects and arrays from `state` after a checkpoint (or an effect): references taken
   * before it are stale, and using one fails the step with code `STALE_STATE`.
   */
  checkpoint(): Promise<void>;
  /**
   * Runs an effect once per key within the run (see {@link EffectDefinition}). When its key is already
   * recorded as done, its recorded result is returned and `run` is not called. Its completion commits
   * the state like `checkpoint()`.
   * @example
   * const receipt = await ctx.effect('charge', {
   *   key: `charge:${state.orderId}`,
   *   run: async (_s, { key }) => payments.charge(state.amount, { idempotencyKey: key }),
   *   compensate: async (r, { compensationKey }) => payments.refund(r.id, { idempotencyKey: compensationKey }),
   * });
   */
  effect<R>(name: string, effect: InlineEffect<Readonly<S>, R>): Promise<R>;
  /**
   * Calls an LLM through the configured tiers, with fallback, retries and circuit breakers, and
   * records the answer in the run's journal: when the step runs again after a crash, a call that
   * already completed returns its recorded answer without a provider call. `ctx.llm.stream()`
   * yields text as it arrives (and a `restart` event when an answer failed midway and starts over
   * on another tier).
   * @example
   * const res = await ctx.llm({ system: 'Be brief.', messages: [{ role: 'user', content: q }], maxTokens: 300 });
   * state.answer = res.text;
   */
  readonly llm: LlmCall;
  /**
   * A durable sleep: the run waits (in the queue, holding nothing, when the sleep is long) and the
   * step runs again from its start when it is over, passing the sleep at once. It survives any
   * number of restarts and, once over, is never re-armed. Names are unique within a run.
   * @example await ctx.sleep('cool-down', '20m');
   */
  sleep(name: string, duration: Duration): Promise<void>;
  /**
   * Waits for the signal `name` (`keel signal RUN NAME --payload JSON`, `engine.signal`) and
   * returns its payload. A signal sent before the run got here is kept and taken at once. With a
   * `timeout`, throws `WaitTimeoutError` (code `WAIT_TIMEOUT`) when it passes; catch it to go on.
   * @example const { approved } = await ctx.waitFor<{ approved: boolean }>('approval', { timeout: '2d' });
   */
  waitFor<T = unknown>(name: string, options?: { timeout?: Duration }): Promise<T>;
}

export type StepFn<S> = (state: Draft<S>, ctx: StepContext<S>) => Promise<void> | void;
export type RouteFn<S, R extends string> = (state: Readonly<S>) => R;

export type WorkflowOptions = {
  version: number;
  /** Most step executions per run, cycles included (default 1,000). */
  maxSteps?: number;
  /**
   * The longest a run may wait in one stretch for an outage to pass (parked, its LLM calls failing)
   * before it is dead-lettered; default 24 hours.
   */
  maxWait?: Duration;
  /**
   * At most this many runs of the workflow carried on at once by workers (each worker counts the
   * runs held by live processes); unlimited when absent.
   */
  concurrency?: number;
  /**
   * `false` keeps the offline degraded tier from answering this workflow's LLM calls: with every
   * real tier down they fail (and under a worker the run waits) rather than finish degraded.
   */
  degraded?: boolean;
  /** Roll back completed effects on its own when the run fails (default false). */
  rollbackOnFailure?: boolean;
  description?: string;
};

export type StepNode = { kind: 'step'; name: string; run: StepFn<unknown>; options: StepOptions };
export type EffectNode = {
  kind: 'effect';
  name: string;
  effect: EffectDefinition<unknown, unknown>;
};
export type GraphNode = StepNode | EffectNode;
export type Route = { from: string; decide: RouteFn<unknown, string>; targets?: readonly string[] };

export type InlineCompensation = Omit<InlineEffect<unknown, unknown>, 'key' | 'run'> & {
  run?: InlineEffect<unknown, unknown>['run'];
};

type WorkflowParts = {
  nodes: readonly GraphNode[];
  routes: ReadonlyMap<string, Route>;
  compensations: ReadonlyMap<string, InlineCompensation>;
  module: string | undefined;
};

/** The shape of a graph, as recorded with each run and compared on resume. */
export type GraphShape = {
  nodes: { name: string; kind: GraphNode['kind'] }[];
  routes: { from: string; targets: string[] | null }[];
};

const WORKFLOW_BRAND = Symbol.for('keel.workflow');

declare const unresolved: unique symbol;

export class Workflow<S, Names extends string = never, Pending extends string = never> {
  readonly [WORKFLOW_BRAND] = true;
  /** Route targets that no step declares yet; `never` once the graph is complete. */
  declare readonly [unresolved]?: Pending;
  readonly name: string;
  readonly options: Readonly<WorkflowOptions>;
  readonly nodes: readonly GraphNode[];
  readonly routes: ReadonlyMap<string, Route>;
  /** Compensations of effects started with `ctx.effect`, by effect name. */
  readonly compensations: ReadonlyMap<string, InlineCompensation>;
  /** The file that defined the workflow, when known; recorded with each run for `resume --all`. */
  readonly module: string | undefined;

  constructor(name: string, options: WorkflowOptions, parts: Partial<WorkflowParts> = {}) {
    this.name = name;
    this.options = options;
    this.nodes = parts.nodes ?? [];
    this.routes = parts.routes ?? new Map();
    this.compensations = parts.compensations ?? new Map();
    this.module = parts.module;
  }

  private with(parts: Partial<WorkflowParts>): Workflow<S, never, never> {
    return new Workflow(this.name, this.options, {
      nodes: this.nodes,
      routes: this.routes,
      compensations: this.compensations,
      module: this.module,
      ...parts,
    });
  }

  /** Adds a step; it receives the state as an immer draft and mutates it. */
  step<N extends string>(
    name: N,
    run: StepFn<S>,
    options: StepOptions = {},
  ): Workflow<S, Names | N, Exclude<Pending, N>> {
    return this.add({ kind: 'step', name, run: run as StepFn<unknown>, options });
  }

  /** Adds an effect step: a side effect with an idempotency key and an optional compensation. */
  effect<N extends string, R>(
    name: N,
    effect: EffectDefinition<Readonly<S>, R>,
  ): Workflow<S, Names | N, Exclude<Pending, N>> {
    return this.add({ kind: 'effect', name, effect: effect as EffectDefinition<unknown, unknown> });
  }

  /**
   * After `from`, go where `decide` says: a step name or `END`. Without a route, a step is followed
   * by the next one declared. Pass `targets` to let keel check the graph (unknown targets,
   * unreachable steps) before a run starts rather than when the route is taken.
   */
  route<R extends string>(
    from: Names,
    decide: RouteFn<S, R>,
    targets?: readonly R[],
  ): Workflow<S, Names, Pending | Exclude<R, Names | END>> {
    const where = `workflow "${this.name}"`;
    if (!this.nodes.some((n) => n.name === from)) {
      throw new DefinitionError(`${where}: route from "${from}", which is not a declared step.`, {
        hint: `Declare the step before its route. Steps: ${this.stepList()}.`,
      });
    }
    if (this.routes.has(from)) {
      throw new DefinitionError(`${where}: step "${from}" already has a route.`, {
        hint: 'One route per step: let a single function decide among all the targets.',
      });
    }
    const routes = new Map(this.routes);
    const route: Route = { from, decide: decide as RouteFn<unknown, string> };
    if (targets) route.targets = [...targets];
    routes.set(from, route);
    return this.with({ routes });
  }

  /**
   * Registers how to undo effects named `effect` that steps start with `ctx.effect`, so that a
   * rollback in another process (after a crash) can compensate them. An inline `compensate` given to
   * `ctx.effect` is used while its process lives; this one always.
   */
  compensation<R = unknown>(
    effect: string,
    compensate: NonNullable<InlineEffect<unknown, R>['compensate']>,
    options: Pick<InlineEffect<unknown, R>, 'reconcile' | 'idempotent' | 'compensateRetry'> = {},
  ): Workflow<S, Names, Pending> {
    const compensations = new Map(this.compensations);
    compensations.set(effect, { ...options, compensate } as InlineCompensation);
    return this.with({ compensations });
  }

  /** The step that follows `from` when no route is declared, or END after the last one. */
  nextInOrder(from: string): string {
    const index = this.index().get(from)?.position ?? this.nodes.length;
    return this.nodes[index + 1]?.name ?? END;
  }

  node(name: string): GraphNode | undefined {
    return this.index().get(name)?.node;
  }

  /** How to reconcile and undo the effect `name`: an effect step's own, or a registered one. */
  effectHandlers(name: string): InlineCompensation | undefined {
    const node = this.node(name);
    return node?.kind === 'effect' ? node.effect : this.compensations.get(name);
  }

  private lookup: Map<string, { node: GraphNode; position: number }> | undefined;

  private index(): Map<string, { node: GraphNode; position: number }> {
    this.lookup ??= new Map(this.nodes.map((node, position) => [node.name, { node, position }]));
    return this.lookup;
  }

  shape(): GraphShape {
    return {
      nodes: this.nodes.map((n) => ({ name: n.name, kind: n.kind })),
      routes: [...this.routes.values()]
        .map((r) => ({ from: r.from, targets: r.targets ? [...r.targets].sort() : null }))
        .sort((a, b) => a.from.localeCompare(b.from)),
    };
  }

  /** Throws {@link DefinitionError} when the graph cannot run: empty, unknown targets, dead steps. */
  validate(): void {
    const where = `workflow "${this.name}"`;
    const { concurrency, maxWait } = this.options;
    if (concurrency !== undefined && (!Number.isInteger(concurrency) || concurrency < 1)) {
      throw new DefinitionError(
        `${where} has concurrency ${JSON.stringify(concurrency)}; it must be a whole number of runs, at least 1.`,
        { hint: 'Leave it out for no limit.' },
      );
    }
    if (maxWait !== undefined) toMs(maxWait, `maxWait of ${where}`);
    if (this.nodes.length === 0) {
      throw new DefinitionError(`${where} has no steps.`, {
        hint: 'Add one with .step(name, fn).',
      });
    }
    if (!Number.isInteger(this.options.version) || this.options.version < 1) {
      throw new DefinitionError(`${where}: version must be a positive integer.`, {
        hint: `Got ${String(this.options.version)}; start at { version: 1 }.`,
      });
    }
    for (const route of this.routes.values()) {
      for (const target of route.targets ?? []) {
        if (target !== END && !this.node(target)) {
          throw new DefinitionError(
            `${where}: the route from "${route.from}" names "${target}", which is not a declared step.`,
            { hint: `Steps: ${this.stepList()}, or END.` },
          );
        }
      }
    }
    const unreachable = this.unreachable();
    if (unreachable.length > 0) {
      throw new DefinitionError(
        `${where}: ${unreachable.map((n) => `"${n}"`).join(', ')} can never run: no step or route leads there.`,
        { hint: 'Remove the step, or add it to the targets of a route that should reach it.' },
      );
    }
  }

  private unreachable(): string[] {
    const seen = new Set<string>();
    const queue = [this.nodes[0]!.name];
    while (queue.length > 0) {
      const name = queue.pop()!;
      if (seen.has(name) || name === END) continue;
      seen.add(name);
      const route = this.routes.get(name);
      if (!route) queue.push(this.nextInOrder(name));
      else if (route.targets) queue.push(...route.targets);
      else return []; // a route without declared targets may lead anywhere
    }
    return this.nodes.filter((n) => !seen.has(n.name)).map((n) => n.name);
  }

  private add(node: GraphNode): Workflow<S, never, never> {
    if (typeof node.name !== 'string' || node.name.length === 0 || node.name === END) {
      throw new DefinitionError(
        `workflow "${this.name}": invalid step name ${JSON.stringify(node.name)}.`,
        {
          hint: `Step names are non-empty strings other than "${END}".`,
        },
      );
    }
    // Stored as UTF-8 text, half a surrogate pair would come back as U+FFFD: another name.
    if (LONE_SURROGATE.test(node.name)) {
      throw new DefinitionError(
        `workflow "${this.name}": invalid step name ${JSON.stringify(node.name)}: it holds half of a surrogate pair.`,
        { hint: 'Use well-formed Unicode text for step names.' },
      );
    }
    if (this.nodes.some((n) => n.name === node.name)) {
      throw new DefinitionError(`workflow "${this.name}": step "${node.name}" is declared twice.`, {
        hint: 'Give every step and effect its own name.',
      });
    }
    return this.with({ nodes: [...this.nodes, node] });
  }

  private stepList(): string {
    return this.nodes.map((n) => `"${n.name}"`).join(', ') || '(none)';
  }
}

/** A workflow whose route targets are all declared: what `engine.start` accepts. */
export type CompleteWorkflow<S> = Workflow<S, string, never>;
/** Makes an unresolved route target a type error where the workflow is used. */
export type CheckRoutes<Pending extends string> = [Pending] extends [never]
  ? unknown
  : { 'a route target is not a declared step': Pending };

/**
 * Starts a workflow definition.
 * @example
 * export default workflow<{ n: number }>('count', { version: 1 })
 *   .step('inc', (state) => { state.n += 1; })
 *   .route('inc', (state) => (state.n < 3 ? 'inc' : END), ['inc', END]);
 */
export function workflow<S extends object>(name: string, options: WorkflowOptions) {
  if (typeof name !== 'string' || !/^[\w.:-]{1,128}$/.test(name)) {
    throw new DefinitionError(`Invalid workflow name ${JSON.stringify(name)}.`, {
      hint: 'Use 1-128 letters, digits, "_", "-", "." or ":".',
    });
  }
  const module = callerModule();
  return new Workflow<S>(name, { ...options }, module ? { module } : {});
}

export function isWorkflow(value: unknown): value is Workflow<unknown, string, never> {
  return typeof value === 'object' && value !== null && WORKFLOW_BRAND in value;
}

/** The file that called `workflow()`, read from the stack: where `resume` will load it from. */
function callerModule(): string | undefined {
  const lines = new Error().stack?.split('\n').slice(1) ?? [];
  for (const line of lines) {
    const match = /\(?((?:file:\/\/)?\/[^():]+):\d+:\d+\)?\s*$/.exec(line);
    const file = match?.[1];
    if (file && !/\/engine\/workflow\.[tj]s$/.test(file)) return file.replace(/^file:\/\//, '');
  }
  return undefined;
}
