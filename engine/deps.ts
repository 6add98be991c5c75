/** What the engine needs from its surroundings, all injected by the adapters that open it. */
import type { Router } from './llm/router.ts';
import type { ParkPolicy } from './queue.ts';
import type { Logger } from './logger.ts';
import type { Keyring } from './secret.ts';
import type { Store, RunRecord } from './store.ts';
import type { Clock } from './time.ts';
import type { Workflow } from './workflow.ts';

/** This process, as lease owners are recorded, and a way to ask whether another one is alive. */
export interface HostInfo {
  readonly name: string;
  readonly pid: number;
  /** True when a process with this id runs on this host (false only when it is certainly gone). */
  isAlive(pid: number): boolean;
}

/** A workflow of any state, as loaded at run time (its routes are checked by `validate()`). */
export type AnyWorkflow = Workflow<unknown, string, never>;

/** Finds the workflow a stored run was started with, from its recorded module and name. */
export type WorkflowLoader = (
  run: Pick<RunRecord, 'id' | 'workflow' | 'module'>,
) => Promise<AnyWorkflow>;

/** Progress notifications, for live displays; they carry no state. */
export type RunEvent =
  | { type: 'run-started' | 'run-resumed'; runId: string; workflow: string; cursor: string | null }
  | { type: 'step-started'; runId: string; step: string; index: number; attempt: number }
  | { type: 'step-completed'; runId: string; step: string; index: number; next: string | null }
  | {
      type: 'step-retrying';
      runId: string;
      step: string;
      attempt: number;
      delayMs: number;
      error: string;
    }
  | {
      type: 'effect-applied' | 'effect-reused';
      runId: string;
      step: string;
      effect: string;
      key: string;
    }
  | { type: 'compensated'; runId: string; effect: string; key: string }
  | {
      type: 'llm-called';
      runId: string;
      step: string;
      position: number;
      tier: string;
      /** Served from the journal, without a provider call. */
      replayed: boolean;
    }
  | { type: 'run-parked'; runId: string; step: string; dueAt: number; waitMs: number }
  | { type: 'run-waiting'; runId: string; step: string; wait: string; dueAt: number | null }
  | { type: 'run-ended'; runId: string; status: string };

export type EngineDeps = {
  store: Store;
  clock: Clock;
  logger: Logger;
  host: HostInfo;
  /** How long a lease lasts without a heartbeat. */
  leaseMs: number;
  maxStateBytes: number;
  /** A full snapshot at least every this many patches. */
  snapshotEvery: number;
  loadWorkflow: WorkflowLoader;
  /** Named crash points: a no-op unless a test armed one. */
  crashPoint: (name: string) => void;
  emit: (event: RunEvent) => void;
  random: () => number;
  /** When a failing run waits in the queue rather than in the process. */
  park: ParkPolicy;
  /** The LLM router behind `ctx.llm`, built on first use. */
  llm: () => Promise<Router>;
  /** The keys secrets are encrypted and decrypted with. */
  secrets: Keyring;
};
