/**
 * The benchmark's own arithmetic and table: a wrong median or a rotation that always runs one
 * contender first would make every published figure wrong without a sign.
 */
import { describe, expect, it } from 'vitest';
import { alternate, markdown, row, show, stats, text, withGoal } from '../bench/lib.ts';

describe('bench statistics', () => {
  it('takes the middle sample, or the mean of the two middle ones, with min and max', () => {
    expect(stats([5, 1, 3])).toEqual({ median: 3, min: 1, max: 5, reps: 3 });
    expect(stats([4, 1, 3, 10])).toEqual({ median: 3.5, min: 1, max: 10, reps: 4 });
    expect(() => stats([])).toThrow('no samples');
  });

  it('rotates which contender goes first from one repetition to the next', async () => {
    const order: string[] = [];
    const results = await alternate(3, {
      a: async (rep) => (order.push(`a${rep}`), rep * 10),
      b: async (rep) => (order.push(`b${rep}`), rep * 10 + 1),
      c: async (rep) => (order.push(`c${rep}`), rep * 10 + 2),
    });
    expect(order).toEqual(['a0', 'b0', 'c0', 'b1', 'c1', 'a1', 'c2', 'a2', 'b2']);
    expect(results).toEqual({ a: [0, 10, 20], b: [1, 11, 21], c: [2, 12, 22] });
  });

  it('gives the ratio of medians against the reference and marks a missed goal', () => {
    const r = row(
      { section: '1', subject: 'keel', metric: 'time per step', unit: 'µs', samples: [30, 36, 33] },
      { subject: 'bare', samples: [20, 22, 24] },
    );
    expect(r).toMatchObject({ median: 33, min: 30, max: 36, reps: 3, versus: 'bare' });
    expect(r.ratio).toBeCloseTo(1.5, 10);
    expect(withGoal(r, '≤ 1.3x floor', (x) => x.ratio! <= 1.3).met).toBe(false);
    expect(withGoal(r, '≤ 2x floor', (x) => x.ratio! <= 2).met).toBe(true);
  });
});

describe('bench table', () => {
  const rows = [
    withGoal(
      row({
        section: '5. queue',
        subject: 'keel',
        metric: 'drained',
        unit: 'runs/s',
        samples: [2255.4, 2216, 2272],
      }),
      '≥ 5,000',
      (x) => x.median >= 5000,
    ),
    row({
      section: '6. memory',
      subject: 'keel',
      metric: 'peak RSS',
      unit: 'MB',
      samples: [57.04],
    }),
  ];

  it('shows thousands separated and three significant figures below 100', () => {
    expect([show(2255.4), show(57.04), show(1.234), show(12345.6)]).toEqual([
      '2,255',
      '57.0',
      '1.23',
      '12,346',
    ]);
  });

  it('writes Markdown with one line per row, min-max only where there are repetitions', () => {
    expect(markdown(rows).split('\n')).toEqual([
      '| Section | Subject | Metric | Median | Min-max | Ratio | Goal |',
      '| -- | -- | -- | --: | --: | -- | -- |',
      '| 5. queue | keel | drained (runs/s) | 2,255 | 2,216-2,272 |  | ≥ 5,000 MISSED |',
      '| 6. memory | keel | peak RSS (MB) | 57.0 |  |  |  |',
    ]);
  });

  it('pads the text table into columns and sets sections apart', () => {
    const lines = text(rows).split('\n');
    expect(lines).toHaveLength(5);
    expect(lines[3]).toBe('');
    expect(lines[2]).toContain('2,255  2,216-2,272');
    expect(lines[2]!.indexOf('keel')).toBe(lines[4]!.indexOf('keel'));
  });
});
