/**
 * Workflow versions. A run records its workflow's version and graph; resuming it with a definition
 * whose graph changed is refused, naming the change, unless the version was raised and the caller
 * allows the change explicitly.
 */
import { createHash } from 'node:crypto';
import { ErrorCode, KeelError } from './errors.ts';
import type { RunRecord, RunUpdate } from './store.ts';
import type { GraphShape } from './workflow.ts';
import type { AnyWorkflow } from './deps.ts';
import { parseStored } from './codec.ts';

export function fingerprint(shape: GraphShape): string {
  return createHash('sha256').update(JSON.stringify(shape)).digest('hex').slice(0, 16);
}

/** Lines such as `step "x" added`, comparing the run's graph with the definition's. */
export function describeChanges(before: GraphShape, after: GraphShape): string[] {
  const changes: string[] = [];
  const names = (s: GraphShape) => s.nodes.map((n) => n.name);
  for (const node of after.nodes) {
    const old = before.nodes.find((n) => n.name === node.name);
    if (!old) changes.push(`${node.kind} "${node.name}" added`);
    else if (old.kind !== node.kind)
      changes.push(`"${node.name}" changed from ${old.kind} to ${node.kind}`);
  }
  for (const node of before.nodes) {
    if (!after.nodes.some((n) => n.name === node.name))
      changes.push(`${node.kind} "${node.name}" removed`);
  }
  const kept = names(after).filter((n) => names(before).includes(n));
  const keptBefore = names(before).filter((n) => names(after).includes(n));
  if (kept.join('\0') !== keptBefore.join('\0')) {
    changes.push(`order changed from ${keptBefore.join(' → ')} to ${kept.join(' → ')}`);
  }
  const routes = (s: GraphShape) =>
    new Map(s.routes.map((r) => [r.from, JSON.stringify(r.targets)]));
  const [oldRoutes, newRoutes] = [routes(before), routes(after)];
  for (const [from, targets] of newRoutes) {
    if (!oldRoutes.has(from)) changes.push(`route from "${from}" added`);
    else if (oldRoutes.get(from) !== targets)
      changes.push(`targets of the route from "${from}" changed`);
  }
  for (const from of oldRoutes.keys()) {
    if (!newRoutes.has(from)) changes.push(`route from "${from}" removed`);
  }
  return changes;
}

/**
 * What resuming `run` with `wf` must record, or a refusal. Same graph: nothing to record (beyond a
 * raised version number). Changed graph: only with a raised version and `allowChange`.
 */
export function checkVersion(run: RunRecord, wf: AnyWorkflow, allowChange: boolean): RunUpdate {
  const shape = wf.shape();
  const print = fingerprint(shape);
  const version = wf.options.version;
  if (print === run.fingerprint) return version === run.version ? {} : { version };
  const changes = describeChanges(parseStored(run.graph) as GraphShape, shape);
  const what = changes.length > 0 ? changes.join('; ') : 'its graph changed';
  const where = `Workflow "${wf.name}" changed since run ${run.id} started (version ${run.version})`;
  if (version <= run.version) {
    throw new KeelError(ErrorCode.versionMismatch, `${where}: ${what}.`, {
      runId: run.id,
      hint: `Restore the definition the run started with, or raise the version to ${run.version + 1} and resume with --allow-version-change.`,
    });
  }
  if (!allowChange) {
    throw new KeelError(ErrorCode.versionMismatch, `${where}, now version ${version}: ${what}.`, {
      runId: run.id,
      hint: 'Resume with --allow-version-change (allowVersionChange: true) to carry the run on under the new graph.',
    });
  }
  return { version, fingerprint: print, graph: JSON.stringify(shape) };
}
