import { execFile } from 'node:child_process';
import {
  existsSync,
  mkdirSync,
  mkdtempSync,
  readFileSync,
  readdirSync,
  rmSync,
  statSync,
  writeFileSync,
} from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { promisify } from 'node:util';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { openEngine, type Engine, type RunEvent, type StepContext } from 'keel';
import brief, {
  publishFile,
  retractFile,
  type Brief,
  type Publication,
} from '../workflows/brief.ts';
import {
  METHOD_LINE,
  dropNearDuplicates,
  jaccard,
  overlap,
  passageSentences,
  renderBrief,
  selectFindings,
  sha256,
  slug,
  splitPassages,
  splitSentences,
  stem,
  stripInline,
  tokenize,
  topicTerms,
  type Finding,
  type Passage,
} from '../workflows/brief-text.ts';

const TOPIC = 'how keel resumes a run after a crash';
const BRIEF_NAME = 'brief-how-keel-resumes-a-run-after-a-crash.md';

describe('tokenize and stem', () => {
  it('lowercases, drops stopwords and strips light suffixes', () => {
    expect(tokenize('How keel resumes a run after a crash')).toEqual([
      'keel',
      'resum',
      'run',
      'crash',
    ]);
    expect(tokenize("Keel's checkpoints: the running step, retried & stopped; crashes.")).toEqual([
      'keel',
      'checkpoint',
      'run',
      'step',
      'retry',
      'stop',
      'crash',
    ]);
  });

  it('brings inflected forms to one stem', () => {
    const forms = ['resume', 'resumes', 'resumed', 'resuming'];
    expect(forms.map(stem)).toEqual(['resum', 'resum', 'resum', 'resum']);
    expect(['crashes', 'crashed', 'crashing'].map(stem)).toEqual(['crash', 'crash', 'crash']);
    expect(['retries', 'retried'].map(stem)).toEqual(['retry', 'retry']);
  });

  it('leaves words alone when stripping would break them', () => {
    expect(
      ['string', 'strings', 'status', 'process', 'called', 'passed', 'speed'].map(stem),
    ).toEqual(['string', 'string', 'status', 'process', 'call', 'pass', 'speed']);
  });

  it('keeps distinct topic terms in order', () => {
    expect(topicTerms('the crash, the CRASHES and crashing')).toEqual(['crash']);
    expect(topicTerms(TOPIC)).toEqual(['keel', 'resum', 'run', 'crash']);
  });
});

describe('scoring', () => {
  it('counts each topic term once', () => {
    const terms = topicTerms(TOPIC);
    expect(overlap(tokenize('A run resumes after a crash, and the crash is logged'), terms)).toBe(
      3,
    );
    expect(overlap(tokenize('Nothing relevant here'), terms)).toBe(0);
  });

  it('computes Jaccard similarity of token sets', () => {
    expect(jaccard(['a', 'b', 'c'], ['b', 'c', 'd'])).toBe(0.5);
    expect(jaccard(['a', 'a', 'b'], ['b', 'a'])).toBe(1);
    expect(jaccard([], [])).toBe(1);
    expect(jaccard(['a'], [])).toBe(0);
  });

  it('drops near-duplicates above 0.8 and keeps the first wording', () => {
    const kept = dropNearDuplicates([
      { text: 'keel resumes runs after crashes' },
      { text: 'Keel resumed the run after the crash.' },
      { text: 'keel resumes runs' },
    ]);
    // The second has the same token set as the first (1.0); the third shares 3 of 4 (0.75).
    expect(kept).toEqual([
      { text: 'keel resumes runs after crashes' },
      { text: 'keel resumes runs' },
    ]);
  });

  it('ranks by score, breaks ties by source order, then dedupes and cuts', () => {
    const finding = (
      text: string,
      file: string,
      line: number,
      score: number,
      seq = 0,
    ): Finding => ({
      text,
      file,
      line,
      heading: '',
      score,
      seq,
    });
    const candidates = [
      finding('Keel resumes the run after a crash.', 'b.md', 3, 3),
      finding('Keel resumes the run after a crash!', 'a.md', 9, 3),
      finding('Leases expire after a crash.', 'a.md', 2, 1, 1),
      finding('A crash stops the run.', 'a.md', 2, 2),
    ];
    const picked = selectFindings(candidates, 10).map((f) => `${f.file}:${f.line}:${f.seq}`);
    expect(picked).toEqual(['a.md:9:0', 'a.md:2:0', 'a.md:2:1']);
    expect(selectFindings(candidates, 1).map((f) => f.text)).toEqual([
      'Keel resumes the run after a crash!',
    ]);
  });
});

describe('slug', () => {
  it('makes file-name-safe ASCII', () => {
    expect(slug(TOPIC)).toBe('how-keel-resumes-a-run-after-a-crash');
    expect(slug('  Café: déjà vu!  ')).toBe('cafe-deja-vu');
    expect(slug("What's new?")).toBe('whats-new');
    expect(slug('!!!')).toBe('brief');
  });

  it('cuts at a word boundary, at most 60 characters', () => {
    expect(slug('word '.repeat(20))).toBe(Array(12).fill('word').join('-'));
    expect(slug('x'.repeat(70))).toBe('x'.repeat(60));
  });
});

describe('Markdown splitting', () => {
  it('splits paragraphs and list items, tracks headings, skips code and tables', () => {
    const markdown = [
      '---',
      'title: x',
      '---',
      '# Top',
      '',
      'Para one line one',
      'line two.',
      '',
      '```',
      'code here',
      '```',
      '- item **one**',
      '- item [two](http://example.invalid)',
      '',
      'Sub',
      '---',
      '',
      '| a | b |',
      '',
      '    indented code',
      '',
      'last `para`.',
    ].join('\n');
    expect(splitPassages(markdown, 'a.md')).toEqual([
      { file: 'a.md', heading: 'Top', line: 6, text: 'Para one line one\nline two.', score: 0 },
      { file: 'a.md', heading: 'Top', line: 12, text: 'item one', score: 0 },
      { file: 'a.md', heading: 'Top', line: 13, text: 'item two', score: 0 },
      { file: 'a.md', heading: 'Sub', line: 22, text: 'last para.', score: 0 },
    ]);
  });

  it('strips inline markup but keeps code spans verbatim', () => {
    expect(stripInline('See **[the guide](guide.md)** and `brief-<slug>.md`<br>, *now*.')).toBe(
      'See the guide and brief-<slug>.md, now.',
    );
    expect(stripInline('![logo](x.png) <https://example.invalid> ``a `b` c``')).toBe(
      'logo https://example.invalid a `b` c',
    );
  });

  it('splits sentences without breaking on "e.g." or file names', () => {
    expect(
      splitSentences('First one here. Second, e.g. this one! Is keel.db safe? 3 items.'),
    ).toEqual([
      { text: 'First one here.', offset: 0 },
      { text: 'Second, e.g. this one!', offset: 16 },
      { text: 'Is keel.db safe?', offset: 39 },
      { text: '3 items.', offset: 56 },
    ]);
  });

  it('cites the line each sentence starts on', () => {
    const passage: Passage = {
      file: 'guide.md',
      heading: 'Resume',
      line: 10,
      text: 'A crash stops the process.\nOn restart keel resumes the run. Short one.',
      score: 0,
    };
    expect(passageSentences(passage, topicTerms(TOPIC))).toEqual([
      {
        text: 'A crash stops the process.',
        file: 'guide.md',
        line: 10,
        heading: 'Resume',
        score: 1,
        seq: 0,
      },
      {
        text: 'On restart keel resumes the run.',
        file: 'guide.md',
        line: 11,
        heading: 'Resume',
        score: 3,
        seq: 1,
      },
    ]);
  });

  it('renders findings with citations and a source list', () => {
    const findings: Finding[] = [
      { text: 'B first.', file: 'b.md', line: 4, heading: '', score: 2, seq: 0 },
      { text: 'A second.', file: 'a.md', line: 7, heading: '', score: 1, seq: 0 },
      { text: 'B third.', file: 'b.md', line: 2, heading: '', score: 1, seq: 0 },
    ];
    expect(renderBrief({ topic: 'x', findings })).toBe(
      [
        '# Research brief',
        '',
        '**Topic:** x',
        '',
        `_${METHOD_LINE}_`,
        '',
        '## Findings',
        '',
        '- B first. (b.md:4)',
        '- A second. (a.md:7)',
        '- B third. (b.md:2)',
        '',
        '## Sources',
        '',
        '- a.md (line 7)',
        '- b.md (lines 2, 4)',
        '',
      ].join('\n'),
    );
  });
});

describe('analyze step', () => {
  it('starts from the recorded progress and checkpoints every five passages', async () => {
    const node = brief.node('analyze');
    if (node?.kind !== 'step') throw new Error('analyze is not a step');
    const passages = Array.from({ length: 7 }, (_, i) => ({
      file: 'p.md',
      heading: '',
      line: i * 2 + 1,
      text: `Passage ${i} says keel resumes the run.`,
      score: 2,
    }));
    const state: Brief = { topic: TOPIC, terms: topicTerms(TOPIC), passages, analyzed: 2 };
    state.candidates = [];
    let checkpoints = 0;
    const ctx = {
      checkpoint: async () => {
        checkpoints += 1;
        // The progress recorded at a checkpoint is what a crash would resume from.
        expect(state.analyzed).toBe(5);
      },
      log: { info: () => {} },
    } as unknown as StepContext;
    await node.run(state, ctx);
    expect(checkpoints).toBe(1);
    expect(state.analyzed).toBe(7);
    expect(state.candidates.map((c) => c.line)).toEqual([5, 7, 9, 11, 13]);
  });
});

const DOCS: Record<string, string> = {
  'guide/resume.md': [
    '# Resuming runs',
    '',
    'After a crash, keel resumes the run from its last checkpoint.',
    'Steps that finished before the crash are not run again.',
    '',
    '- Effects recorded as done are skipped when a run resumes.',
    '',
  ].join('\n'),
  'leases.md': [
    '# Leases',
    '',
    'Every run has a lease that its worker renews.',
    'When a worker crashes, its lease expires and another process takes the run over.',
    '',
  ].join('\n'),
  'effects.md': [
    '# Effects',
    '',
    'An effect carries an idempotency key, and rollback calls its compensation.',
    '',
  ].join('\n'),
  // Never searched: installed packages, dot-folders.
  'node_modules/pkg/README.md': 'Keel resumes a run after a crash, says a package.\n',
  '.keel/notes.md': 'Keel resumes a run after a crash, says a hidden note.\n',
};

describe('brief workflow, end to end', () => {
  let root: string;
  let docs: string;
  let outbox: string;
  let engine: Engine;

  beforeEach(() => {
    root = mkdtempSync(join(tmpdir(), 'keel-brief-'));
    docs = join(root, 'docs');
    // Inside the docs folder on purpose: search must not read the briefs it published.
    outbox = join(docs, 'briefs');
    for (const [file, text] of Object.entries(DOCS)) {
      mkdirSync(dirname(join(docs, file)), { recursive: true });
      writeFileSync(join(docs, file), text);
    }
    engine = openEngine({ db: join(root, 'keel.db') });
  });

  afterEach(async () => {
    await engine.close();
    rmSync(root, { recursive: true, force: true });
  });

  const publication = async (id: string) =>
    (await engine.get(id)).effects.find((e) => e.name === 'publish')?.result as Publication;

  it('publishes once per key; rollback removes what it published once no other run shares it', async () => {
    const input: Brief = { topic: TOPIC, docs, outbox };
    const first = await engine.start(brief, input);
    expect(first.error).toBeNull();
    expect(first.status).toBe('completed');

    const path = join(outbox, BRIEF_NAME);
    const published = await publication(first.id);
    expect(published.path).toBe(path);
    expect(published.replaced).toBeNull();
    const text = readFileSync(path, 'utf8');
    expect(text).toBe(first.state.draft);
    expect(text).toContain(METHOD_LINE);
    expect(text).toContain(
      '- After a crash, keel resumes the run from its last checkpoint. (guide/resume.md:3)',
    );
    expect(text).not.toMatch(/node_modules|\.keel|briefs\//);
    expect(first.state.searched).toEqual({ files: 3, passages: 4 });

    const before = statSync(path);
    await new Promise((r) => setTimeout(r, 20));
    const second = await engine.start(brief, input);
    expect(second.status).toBe('completed');
    expect(second.state.draft).toBe(first.state.draft);
    expect(await publication(second.id)).toEqual(published);
    const after = statSync(path);
    // A rewrite would rename a new file into place: new inode, new mtime.
    expect(after.ino).toBe(before.ino);
    expect(after.mtimeMs).toBe(before.mtimeMs);

    // The publication is the first run's too: undoing the second leaves it in place.
    const rolledBack = await engine.rollback(second.id);
    expect(rolledBack.status).toBe('rolled_back');
    expect(rolledBack.rollback?.compensated).toEqual(['publish']);
    expect(readFileSync(path, 'utf8')).toBe(text);

    // Undoing the last run that owns it removes it.
    expect((await engine.rollback(first.id)).status).toBe('rolled_back');
    expect(existsSync(path)).toBe(false);
  });

  it('restores the previous content of a file it replaced', async () => {
    const path = join(outbox, BRIEF_NAME);
    mkdirSync(outbox, { recursive: true });
    writeFileSync(path, 'hand-written notes\n');

    const run = await engine.start(brief, { topic: TOPIC, docs, outbox });
    expect(run.status).toBe('completed');
    expect((await publication(run.id)).replaced).toBe('hand-written notes\n');
    expect(readFileSync(path, 'utf8')).toContain(METHOD_LINE);

    expect((await engine.rollback(run.id)).status).toBe('rolled_back');
    expect(readFileSync(path, 'utf8')).toBe('hand-written notes\n');
  });

  it('leaves a file edited after publication alone and reports it', async () => {
    const run = await engine.start(brief, { topic: TOPIC, docs, outbox });
    const path = join(outbox, BRIEF_NAME);
    writeFileSync(path, 'edited by hand\n');

    const rolledBack = await engine.rollback(run.id);
    expect(rolledBack.status).toBe('compensation_failed');
    expect(rolledBack.error?.message).toContain('was edited after publication and was left alone');
    expect(readFileSync(path, 'utf8')).toBe('edited by hand\n');
  });

  it('analyzes across its checkpoints without needing a retry', async () => {
    const many = join(root, 'many');
    mkdirSync(many);
    const names = 'alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima';
    const paragraphs = names.split(' ').map((n) => `Worker ${n} resumes the run after a crash.`);
    writeFileSync(join(many, 'runs.md'), `# Runs\n\n${paragraphs.join('\n\n')}\n`);
    const events: RunEvent[] = [];
    const watched = openEngine({ db: join(root, 'watched.db'), onEvent: (e) => events.push(e) });
    try {
      const run = await watched.start(brief, { topic: TOPIC, docs: many, outbox, maxFindings: 3 });
      expect(run.error).toBeNull();
      expect(run.status).toBe('completed');
      expect(run.state.analyzed).toBe(12);
      expect(events.filter((e) => e.type === 'step-retrying')).toEqual([]);
      expect(run.state.findings?.map((f) => `${f.file}:${f.line}`)).toEqual([
        'runs.md:3',
        'runs.md:5',
        'runs.md:7',
      ]);
    } finally {
      await watched.close();
    }
  });

  it('fails with the folder searched and how to pass another one', async () => {
    const empty = join(root, 'empty');
    mkdirSync(empty);
    const run = await engine.start(brief, { docs: empty, outbox });
    expect(run.status).toBe('failed');
    expect(run.error?.message).toBe(
      `No Markdown (.md) files were found under ${empty}. Pass the folder to search with ` +
        `--input '{"docs":"path"}'.`,
    );
  });

  it('does not publish twice when the process dies after writing the file', async () => {
    const db = join(root, 'crash.db');
    // .mts: the temp folder has no package.json saying its .ts files are ES modules.
    const child = join(root, 'child.mts');
    const keel = fileURLToPath(new URL('../adapters/index.ts', import.meta.url));
    const workflowFile = fileURLToPath(new URL('../workflows/brief.ts', import.meta.url));
    writeFileSync(
      child,
      [
        `import { openEngine } from ${JSON.stringify(keel)};`,
        `import brief from ${JSON.stringify(workflowFile)};`,
        `const engine = openEngine({ db: ${JSON.stringify(db)} });`,
        `const input = ${JSON.stringify({ topic: TOPIC, docs, outbox })};`,
        `await engine.start(brief, input, { id: 'r1' });`,
      ].join('\n'),
    );
    const crashed = await promisify(execFile)(process.execPath, ['--import', 'tsx', child], {
      cwd: fileURLToPath(new URL('..', import.meta.url)),
      env: { ...process.env, KEEL_CRASH_AT: 'effect:after-run' },
    }).then(
      () => null,
      (error: { signal?: string }) => error.signal,
    );
    expect(crashed).toBe('SIGKILL');
    const path = join(outbox, BRIEF_NAME);
    const written = statSync(path);

    const resumer = openEngine({ db });
    try {
      const resumed = await resumer.resume('r1', { workflow: brief });
      expect(resumed.status).toBe('completed');
      const effect = (await resumer.get('r1')).effects[0]!;
      expect(effect.attempts).toBe(2);
      expect((effect.result as Publication).path).toBe(path);
    } finally {
      await resumer.close();
    }
    expect(statSync(path).ino).toBe(written.ino);
    expect(statSync(path).mtimeMs).toBe(written.mtimeMs);
  });
});

describe('publishFile and retractFile', () => {
  it('honour the key, and undoing twice is the same as once', async () => {
    const outbox = mkdtempSync(join(tmpdir(), 'keel-outbox-'));
    try {
      const path = join(outbox, 'brief-x.md');
      writeFileSync(path, 'before\n');
      const result = await publishFile(outbox, 'brief-x.md', 'after\n', 'publish:x:1');
      expect(result).toEqual({
        path,
        bytes: 6,
        sha256: '7b9a72466d3960eb2aacccfc848939453490db0678bd4725def3f789b891c919',
        replaced: 'before\n',
      });
      expect(readdirSync(join(outbox, '.published'))).toHaveLength(1);
      // Same key, other content: the ledger answers and nothing is written.
      expect(await publishFile(outbox, 'brief-x.md', 'other\n', 'publish:x:1')).toEqual(result);
      expect(readFileSync(path, 'utf8')).toBe('after\n');

      await retractFile(result, 'publish:x:1');
      await retractFile(result, 'publish:x:1');
      expect(readFileSync(path, 'utf8')).toBe('before\n');
      expect(readdirSync(join(outbox, '.published'))).toEqual([]);
    } finally {
      rmSync(outbox, { recursive: true, force: true });
    }
  });

  it('two runs that publish the same brief share it: undoing one leaves the file for the other', async () => {
    const outbox = mkdtempSync(join(tmpdir(), 'keel-outbox-'));
    try {
      const path = join(outbox, 'brief-x.md');
      writeFileSync(path, 'before\n');
      const key = 'publish:x:3';
      const first = await publishFile(outbox, 'brief-x.md', 'after\n', key, 'run-a');
      const second = await publishFile(outbox, 'brief-x.md', 'after\n', key, 'run-b');
      expect(second).toEqual(first);
      const ledger = join(outbox, '.published', `${sha256(key, 16)}.json`);
      const owners = () =>
        (JSON.parse(readFileSync(ledger, 'utf8')) as { owners: string[] }).owners;
      expect(owners()).toEqual(['run-a', 'run-b']);

      // The second run rolls back (twice, as after a crash): the first run's file stays.
      await retractFile(second, key, 'run-b');
      await retractFile(second, key, 'run-b');
      expect(readFileSync(path, 'utf8')).toBe('after\n');
      expect(owners()).toEqual(['run-a']);
      // The last owner rolls back: the file is as it was before either.
      await retractFile(first, key, 'run-a');
      expect(readFileSync(path, 'utf8')).toBe('before\n');
      expect(readdirSync(join(outbox, '.published'))).toEqual([]);
    } finally {
      rmSync(outbox, { recursive: true, force: true });
    }
  });

  it('keep the original content when an earlier attempt died half-way', async () => {
    const outbox = mkdtempSync(join(tmpdir(), 'keel-outbox-'));
    try {
      const path = join(outbox, 'brief-x.md');
      const key = 'publish:x:2';
      // What a process leaves when it dies after replacing the file but before recording it.
      const pending = { path, bytes: 6, sha256: sha256('after\n'), replaced: 'before\n' };
      mkdirSync(join(outbox, '.published'));
      writeFileSync(
        join(outbox, '.published', `${sha256(key, 16)}.json`),
        JSON.stringify({ key, status: 'pending', result: pending }),
      );
      writeFileSync(path, 'after\n');

      const result = await publishFile(outbox, 'brief-x.md', 'after\n', key);
      expect(result).toEqual(pending);
      await retractFile(result, key);
      expect(readFileSync(path, 'utf8')).toBe('before\n');
    } finally {
      rmSync(outbox, { recursive: true, force: true });
    }
  });
});
