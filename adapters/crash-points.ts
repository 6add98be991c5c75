/**
 * Named crash points for tests: `KEEL_CRASH_AT=effect:after-run` (or `…@3` for the third time it is
 * reached; several separated by commas) makes this process kill itself with SIGKILL there, exactly as
 * a power cut or the OOM killer would. Unset, every point is a no-op.
 */
export function crashPointsFromEnv(spec = process.env.KEEL_CRASH_AT): (name: string) => void {
  if (!spec) return () => {};
  const armed = new Map<string, number>();
  for (const part of spec.split(',')) {
    const [name, nth] = part.trim().split('@');
    if (name) armed.set(name, Number(nth ?? 1));
  }
  const hits = new Map<string, number>();
  return (name) => {
    const target = armed.get(name);
    if (target === undefined) return;
    const count = (hits.get(name) ?? 0) + 1;
    hits.set(name, count);
    if (count === target) process.kill(process.pid, 'SIGKILL');
  };
}
