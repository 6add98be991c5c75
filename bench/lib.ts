/**
 * What every benchmark section shares: repetitions that alternate the contenders, the statistics
 * reported (median and min-max), the bytes the process wrote, and the rows of the results table.
 */
import { readFileSync } from 'node:fs';

/** One line of the results table. */
export interface Row {
  section: string;
  /** Who was measured: `keel (NORMAL)`, `bare better-sqlite3 (NORMAL)`, `LangGraph.js`, ... */
  subject: string;
  metric: string;
  unit: string;
  median: number;
  min: number;
  max: number;
  reps: number;
  /** This row's median over the reference row's, where the section compares. */
  ratio?: number;
  /** What the ratio is against. */
  versus?: string;
  /** The goal keel must meet on this row, and whether it did. */
  goal?: string;
  met?: boolean;
  note?: string;
}

export interface Stats {
  median: number;
  min: number;
  max: number;
  reps: number;
}

export function stats(samples: readonly number[]): Stats {
  if (samples.length === 0) throw new Error('no samples');
  const sorted = [...samples].sort((a, b) => a - b);
  const mid = sorted.length >> 1;
  const median = sorted.length % 2 ? sorted[mid]! : (sorted[mid - 1]! + sorted[mid]!) / 2;
  return { median, min: sorted[0]!, max: sorted.at(-1)!, reps: sorted.length };
}

/**
 * Runs each contender once per repetition, in an order that rotates from one repetition to the
 * next, so that warm caches, a busy neighbour or a growing heap fall on all of them alike.
 */
export async function alternate<K extends string, T>(
  reps: number,
  contenders: Record<K, (rep: number) => Promise<T>>,
): Promise<Record<K, T[]>> {
  const names = Object.keys(contenders) as K[];
  const results = Object.fromEntries(names.map((name) => [name, [] as T[]])) as Record<K, T[]>;
  for (let rep = 0; rep < reps; rep++) {
    for (let i = 0; i < names.length; i++) {
      const name = names[(rep + i) % names.length]!;
      results[name].push(await contenders[name](rep));
    }
  }
  return results;
}

/**
 * Bytes this process has passed to write(2) and its kin so far (`wchar` of /proc/self/io): what
 * it wrote, to the WAL, the database and the journal alike, whether or not the file grew. Linux
 * only; elsewhere null, and the table says so.
 */
export function bytesWritten(): number | null {
  try {
    const io = readFileSync('/proc/self/io', 'utf8');
    const match = /^wchar:\s*(\d+)$/m.exec(io);
    return match ? Number(match[1]) : null;
  } catch {
    return null;
  }
}

/** Microseconds since `started` (from `process.hrtime.bigint()`). */
export const usSince = (started: bigint) => Number(process.hrtime.bigint() - started) / 1000;

export function row(
  fields: Omit<Row, keyof Stats> & { samples: readonly number[] },
  reference?: { subject: string; samples: readonly number[] },
): Row {
  const { samples, ...rest } = fields;
  const s = stats(samples);
  const out: Row = { ...rest, ...s };
  if (reference) {
    out.ratio = s.median / stats(reference.samples).median;
    out.versus = reference.subject;
  }
  return out;
}

/** Marks a row with its goal; `met` says whether the row meets it. */
export function withGoal(r: Row, goal: string, met: (r: Row) => boolean): Row {
  return { ...r, goal, met: met(r) };
}

const number = (n: number) =>
  Math.abs(n) >= 100 ? n.toFixed(0) : Math.abs(n) >= 10 ? n.toFixed(1) : n.toFixed(2);

/** A value as the table shows it, thousands separated. */
export function show(n: number): string {
  const text = number(n);
  const [whole, fraction] = text.split('.');
  const grouped = whole!.replace(/\B(?=(\d{3})+(?!\d))/g, ',');
  return fraction ? `${grouped}.${fraction}` : grouped;
}

const COLUMNS = ['Section', 'Subject', 'Metric', 'Median', 'Min-max', 'Ratio', 'Goal'] as const;

function cells(r: Row): string[] {
  const goal = r.goal ? `${r.goal} ${r.met ? 'met' : 'MISSED'}` : '';
  return [
    r.section,
    r.subject,
    `${r.metric} (${r.unit})`,
    show(r.median),
    r.reps > 1 ? `${show(r.min)}-${show(r.max)}` : '',
    r.ratio !== undefined ? `${r.ratio.toFixed(2)}x ${r.versus}` : '',
    goal,
  ];
}

/** The table in Markdown, as the README and the results folder carry it. */
export function markdown(rows: readonly Row[]): string {
  const lines = [
    `| ${COLUMNS.join(' | ')} |`,
    `| ${COLUMNS.map((c) => (c === 'Median' || c === 'Min-max' ? '--:' : '--')).join(' | ')} |`,
  ];
  for (const r of rows) lines.push(`| ${cells(r).join(' | ')} |`);
  return lines.join('\n');
}

/** The table in plain text for a terminal: columns padded, sections set apart. */
export function text(rows: readonly Row[]): string {
  const table = [COLUMNS as readonly string[], ...rows.map(cells)];
  const widths = COLUMNS.map((_, i) => Math.max(...table.map((r) => r[i]!.length)));
  const line = (r: readonly string[]) =>
    r
      .map((c, i) => (i === 3 || i === 4 ? c.padStart(widths[i]!) : c.padEnd(widths[i]!)))
      .join('  ')
      .trimEnd();
  const out = [line(table[0]!), widths.map((w) => '-'.repeat(w)).join('  ')];
  let section = '';
  for (const r of rows) {
    if (r.section !== section && section !== '') out.push('');
    section = r.section;
    out.push(line(cells(r)));
  }
  return out.join('\n');
}
