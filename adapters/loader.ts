/**
 * Loading workflow definitions from files: `keel run FILE` and resuming a run from its recorded module.
 * TypeScript files load through tsx, which the `keel` command registers before anything else.
 */
import { existsSync } from 'node:fs';
import { resolve } from 'node:path';
import { pathToFileURL } from 'node:url';
import type { AnyWorkflow, WorkflowLoader } from '../engine/deps.ts';
import { DefinitionError, InputError } from '../engine/errors.ts';
import { isWorkflow } from '../engine/workflow.ts';

/** Every workflow a module exports (default first), by name. */
export async function loadWorkflows(file: string): Promise<AnyWorkflow[]> {
  const path = resolve(file);
  if (!existsSync(path)) {
    throw new InputError(`Workflow file ${path} does not exist.`, {
      hint: 'Check the path; it is relative to the current folder.',
    });
  }
  let module: Record<string, unknown>;
  try {
    module = await importModule(path);
  } catch (error) {
    throw new DefinitionError(
      `Workflow file ${path} failed to load: ${(error as Error).message ?? String(error)}`,
      {
        cause: error,
        hint: 'Fix the error above; the file must import `workflow` from "keel" and export the workflow.',
      },
    );
  }
  const found: AnyWorkflow[] = [];
  // A CommonJS-compiled file arrives as { default: module.exports }.
  const inner = module.default;
  const exports =
    typeof inner === 'object' && inner !== null && !isWorkflow(inner)
      ? (inner as Record<string, unknown>)
      : module;
  for (const [name, value] of Object.entries(exports)) {
    if (isWorkflow(value) && !found.includes(value)) {
      if (name === 'default') found.unshift(value);
      else found.push(value);
    }
  }
  return found.map((wf) => (wf.module === path ? wf : withModule(wf, path)));
}

/**
 * Imports a workflow file. A `.ts` file in a project whose package.json does not say
 * `"type": "module"` is compiled as CommonJS, and its `import ... from 'keel'` then becomes a
 * require() of an ES module that Node 20 refuses inside an import; tsx's scoped `tsImport` loads such
 * a file as the ES module it is written as.
 */
async function importModule(path: string): Promise<Record<string, unknown>> {
  const url = pathToFileURL(path).href;
  try {
    return (await import(url)) as Record<string, unknown>;
  } catch (error) {
    const code = (error as NodeJS.ErrnoException).code;
    if (code !== 'ERR_REQUIRE_CYCLE_MODULE' && code !== 'ERR_REQUIRE_ESM') throw error;
    const { tsImport } = await import('tsx/esm/api');
    return (await tsImport(url, import.meta.url)) as Record<string, unknown>;
  }
}

/** The one workflow of a file, or the one named `name`. */
export async function loadWorkflow(file: string, name?: string): Promise<AnyWorkflow> {
  const found = await loadWorkflows(file);
  if (found.length === 0) {
    throw new DefinitionError(`${resolve(file)} exports no workflow.`, {
      hint: "Export one: `export default workflow<State>('name', { version: 1 }).step(...)`.",
    });
  }
  if (name !== undefined) {
    const match = found.find((wf) => wf.name === name);
    if (!match) {
      throw new InputError(`${resolve(file)} has no workflow named "${name}".`, {
        hint: `It exports: ${found.map((wf) => wf.name).join(', ')}.`,
      });
    }
    return match;
  }
  const names = new Set(found.map((wf) => wf.name));
  if (names.size > 1) {
    throw new InputError(`${resolve(file)} exports several workflows: ${[...names].join(', ')}.`, {
      hint: 'Choose one with --workflow NAME.',
    });
  }
  return found[0]!;
}

/** Resolves a stored run's workflow from the module it recorded. */
export const loadFromRecordedModule: WorkflowLoader = async (run) => {
  if (!run.module) {
    throw new InputError(
      `Run ${run.id} recorded no workflow file to load "${run.workflow}" from.`,
      {
        runId: run.id,
        hint: 'Resume it from code with engine.resume(id, { workflow }).',
      },
    );
  }
  if (!existsSync(run.module)) {
    throw new InputError(`Run ${run.id} was started from ${run.module}, which no longer exists.`, {
      runId: run.id,
      hint: `Restore it, or say where it is now: keel resume ${run.id} --file NEW_PATH (or keel rollback ${run.id} --file NEW_PATH).`,
    });
  }
  return loadWorkflow(run.module, run.workflow);
};

function withModule(wf: AnyWorkflow, module: string): AnyWorkflow {
  return Object.assign(Object.create(Object.getPrototypeOf(wf) as object) as AnyWorkflow, wf, {
    module,
  });
}
