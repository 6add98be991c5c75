/**
 * The `brief` workflow: a research pipeline that reads a folder of Markdown documents and publishes
 * a short, cited brief on a topic.
 *
 *   search   finds the Markdown files, splits them into passages and keeps those that share the
 *            most terms with the topic;
 *   analyze  splits those passages into sentences, ranks them by overlap with the topic and drops
 *            near-duplicates, checkpointing as it goes;
 *   write    asks an LLM (`ctx.llm`) for a short summary of the findings, then drafts the brief
 *            as Markdown, every finding with its `(path:line)` citation;
 *   publish  writes `<outbox>/brief-<topic-slug>.md`, once per key; rollback puts back what the
 *            file held before, unless someone has edited it since.
 *
 * The findings are extracted, not generated, so the same documents and topic always give the same
 * findings. The summary comes from the first LLM tier that answers: Anthropic when
 * ANTHROPIC_API_KEY is set, then OpenAI when OPENAI_API_KEY is set, then a local server (Ollama,
 * LM Studio), and with none of them the offline tier, whose summary is extracted and marked
 * degraded (see the README's "LLM calls" section to configure tiers). A crash after the summary
 * was answered does not pay for it again: the journal returns it.
 *
 * Run it (every input is optional; by default it reads this repository's own docs):
 *
 *   keel run workflows/brief.ts
 *   keel run workflows/brief.ts --input '{"topic":"how leases stop two workers"}'
 *   keel run workflows/brief.ts --input '{"topic":"effects","docs":"../notes","outbox":"out"}'
 *
 * then undo the publication with `keel rollback <run id>`.
 */
import { randomBytes } from 'node:crypto';
import type { Dirent } from 'node:fs';
import { mkdir, open, readFile, readdir, rename, rm, stat } from 'node:fs/promises';
import { basename, dirname, join, relative, resolve, sep } from 'node:path';
import { fileURLToPath } from 'node:url';
import { TerminalError, workflow, type CompleteWorkflow } from 'keel';
import {
  passageSentences,
  renderBrief,
  scorePassages,
  selectFindings,
  sha256,
  slug,
  offlineSummary,
  summaryPrompt,
  type Summary,
  splitPassages,
  topPassages,
  topicTerms,
  type Finding,
  type Passage,
} from './brief-text.ts';

/** The state of a `brief` run: the first five fields are its input, the rest are set by steps. */
export type Brief = {
  /** What the brief is about (default {@link DEFAULT_TOPIC}). */
  topic?: string;
  /** The folder searched for Markdown files (default: the folder that holds `workflows/`). */
  docs?: string;
  /** Where the brief is published (default: `outbox` under the current folder). */
  outbox?: string;
  /** Passages kept by `search` (default 40). */
  maxPassages?: number;
  /** Findings kept by `analyze` (default 8). */
  maxFindings?: number;
  /** The topic's stemmed terms, as matched against the documents. */
  terms?: string[];
  /** What `search` looked at, for the record. */
  searched?: { files: number; passages: number };
  /** The best passages, best first. */
  passages?: Passage[];
  /** How many of `passages` `analyze` has processed: where it resumes after a crash. */
  analyzed?: number;
  /** Every scored sentence found so far, before ranking. */
  candidates?: Finding[];
  findings?: Finding[];
  /** The summary of the findings, and which LLM tier wrote it. */
  summary?: Summary;
  /** The brief as Markdown. */
  draft?: string;
};

/** What `publish` records, and what its compensation needs to undo it. */
export type Publication = {
  /** Absolute path of the published file. */
  path: string;
  bytes: number;
  /** sha256 (hex) of the published content: tells whether the file was edited since. */
  sha256: string;
  /** The file's content before publication; null when there was no file. */
  replaced: string | null;
};

export const DEFAULT_TOPIC = 'how keel resumes a run after a crash';
const DEFAULT_MAX_PASSAGES = 40;
const DEFAULT_MAX_FINDINGS = 8;
/** Few enough that a crash loses little work, enough that checkpoints do not dominate. */
const CHECKPOINT_EVERY = 5;
/** Per-key ledger of publications, inside the outbox; a dot-folder so that search skips it. */
const LEDGER_FOLDER = '.published';
const SKIPPED_FOLDERS = new Set(['node_modules', 'outbox']);

/** The repository root: `workflows/` sits directly in it. */
const REPOSITORY_ROOT = fileURLToPath(new URL('..', import.meta.url));

/** {@link Brief}'s input fields, defaults applied. */
export type BriefSettings = Required<
  Pick<Brief, 'topic' | 'docs' | 'outbox' | 'maxPassages' | 'maxFindings'>
>;

/**
 * The input with its defaults applied. `search` writes the result back into the state, so later
 * steps (and a resume in another folder) see the same absolute paths as the first run.
 */
export function settings(state: Readonly<Brief>): BriefSettings {
  return {
    topic: state.topic ?? DEFAULT_TOPIC,
    docs: resolve(state.docs ?? REPOSITORY_ROOT),
    outbox: resolve(state.outbox ?? 'outbox'),
    maxPassages: state.maxPassages ?? DEFAULT_MAX_PASSAGES,
    maxFindings: state.maxFindings ?? DEFAULT_MAX_FINDINGS,
  };
}

/** The file name a topic is published under. */
export function briefFileName(topic: string): string {
  return `brief-${slug(topic)}.md`;
}

/** A changed draft is a different publication, so the key carries a hash of the draft. */
export function publishKey(state: Readonly<Brief>): string {
  return `publish:${slug(settings(state).topic)}:${sha256(state.draft ?? '', 12)}`;
}

/** `brief`: search → analyze → write → publish. See the top of this file. */
export default workflow<Brief>('brief', {
  version: 1,
  description:
    'Cited brief on a topic from a folder of Markdown documents, summarised by the first LLM tier that answers.',
})
  .step('search', async (state) => {
    checkInput(state);
    const input = settings(state);
    const terms = topicTerms(input.topic);
    if (terms.length === 0) {
      throw new TerminalError(
        `The topic ${JSON.stringify(input.topic)} has no words to search for once common words ` +
          `are left out. Pass a more specific one: --input '{"topic":"..."}'.`,
      );
    }
    const files = await markdownFiles(input.docs, input.outbox);
    if (files.length === 0) {
      throw new TerminalError(
        `No Markdown (.md) files were found under ${input.docs}. Pass the folder to search with ` +
          `--input '{"docs":"path"}'.`,
      );
    }
    const all: Passage[] = [];
    for (const file of files) {
      const name = relative(input.docs, file).split(sep).join('/');
      all.push(...splitPassages(await readFile(file, 'utf8'), name));
    }
    const passages = topPassages(scorePassages(all, terms), input.maxPassages);
    if (passages.length === 0) {
      throw new TerminalError(
        `None of the ${files.length} Markdown files under ${input.docs} mentions any of the ` +
          `topic's terms (${terms.join(', ')}). Try another topic, or another folder with ` +
          `--input '{"docs":"path"}'.`,
      );
    }
    Object.assign(state, input);
    state.terms = terms;
    state.searched = { files: files.length, passages: all.length };
    state.passages = passages;
    // A new passage list invalidates any analysis of an earlier one.
    state.analyzed = 0;
    state.candidates = [];
  })
  .step(
    'analyze',
    async (state, ctx) => {
      // A plain copy: `state.terms` itself is a draft that the first checkpoint would revoke.
      const terms = [...(state.terms ?? [])];
      const total = state.passages?.length ?? 0;
      // Starts from the recorded progress: after a crash or a retry, the passages analysed before
      // the last checkpoint are not read again. Passages and candidates are read through `state`
      // on each turn because a checkpoint makes earlier references to nested objects stale.
      let index = state.analyzed ?? 0;
      while (index < total) {
        const passage = state.passages![index]!;
        (state.candidates ??= []).push(...passageSentences(passage, terms));
        index += 1;
        state.analyzed = index;
        if (index % CHECKPOINT_EVERY === 0 && index < total) await ctx.checkpoint();
      }
      const candidates = (state.candidates ??= []);
      state.findings = selectFindings(candidates, settings(state).maxFindings);
      ctx.log.info('analysis done', {
        passages: total,
        sentences: candidates.length,
        findings: state.findings.length,
      });
    },
    { retry: { attempts: 3 } },
  )
  .step(
    'write',
    async (state, ctx) => {
      const { topic } = settings(state);
      const findings = state.findings ?? [];
      if (findings.length > 0) {
        const prompt = summaryPrompt(topic, findings);
        const res = await ctx.llm({
          system: prompt.system,
          messages: [{ role: 'user', content: prompt.user }],
          maxTokens: 300,
          temperature: 0,
        });
        const { degraded, provider, model, tier } = res;
        // With no model to write it, the offline tier's pick is replaced by the brief's own: its
        // three best findings, each with its number.
        const text = degraded ? offlineSummary(findings) : res.text.trim();
        if (text !== '') state.summary = { text, degraded, provider, model, tier };
        ctx.log.info('summary', { tier: res.tier, degraded: res.degraded });
      }
      state.draft = renderBrief({ topic, findings, summary: state.summary });
    },
    { retry: { attempts: 3 } },
  )
  .effect('publish', {
    key: publishKey,
    run: (state, { key, runId }) => {
      const { outbox, topic } = settings(state);
      return publishFile(outbox, briefFileName(topic), state.draft ?? '', key, runId);
    },
    compensate: (result, { key, runId }) => retractFile(result, key, runId),
  }) satisfies CompleteWorkflow<Brief>;

/** Input comes from JSON on the command line, so its types are checked before anything is used. */
function checkInput(input: Readonly<Brief>): void {
  const problems: string[] = [];
  if (input.topic !== undefined && (typeof input.topic !== 'string' || !input.topic.trim())) {
    problems.push('"topic" must be a non-empty string');
  }
  for (const field of ['docs', 'outbox'] as const) {
    const value = input[field];
    if (value !== undefined && (typeof value !== 'string' || value === '')) {
      problems.push(`"${field}" must be a path, got ${JSON.stringify(value)}`);
    }
  }
  for (const field of ['maxPassages', 'maxFindings'] as const) {
    const value = input[field];
    if (value !== undefined && (!Number.isInteger(value) || value < 1)) {
      problems.push(`"${field}" must be a positive integer, got ${JSON.stringify(value)}`);
    }
  }
  if (problems.length > 0) throw new TerminalError(`Invalid input: ${problems.join('; ')}.`);
}

/**
 * Markdown files under `root`, sorted so that ties in ranking always fall the same way. Dot-folders
 * (.git, .keel, the ledger), node_modules and outboxes are skipped: a brief must not cite earlier
 * briefs or installed packages. Symbolic links are not followed, so a link cycle cannot trap it.
 */
async function markdownFiles(root: string, outbox: string): Promise<string[]> {
  let rootStat;
  try {
    rootStat = await stat(root);
  } catch (error) {
    if ((error as NodeJS.ErrnoException).code !== 'ENOENT') throw error;
    throw new TerminalError(
      `The docs folder ${root} does not exist. Pass the folder to search with ` +
        `--input '{"docs":"path"}'.`,
    );
  }
  if (!rootStat.isDirectory()) {
    throw new TerminalError(
      `${root} is not a folder. Pass the folder to search with --input '{"docs":"path"}'.`,
    );
  }
  const found: string[] = [];
  const walk = async (folder: string): Promise<void> => {
    const entries: Dirent[] = await readdir(folder, { withFileTypes: true });
    entries.sort((a, b) => (a.name < b.name ? -1 : a.name > b.name ? 1 : 0));
    for (const entry of entries) {
      if (entry.name.startsWith('.')) continue;
      const path = join(folder, entry.name);
      if (entry.isDirectory()) {
        if (!SKIPPED_FOLDERS.has(entry.name) && path !== outbox) await walk(path);
      } else if (entry.isFile() && /\.(md|markdown)$/i.test(entry.name)) {
        found.push(path);
      }
    }
  };
  await walk(root);
  return found;
}

type LedgerEntry = {
  key: string;
  status: 'pending' | 'done';
  result: Publication;
  /** The runs whose publication this is: two runs that draft the same brief share one. */
  owners?: string[];
};

function ledgerPath(folder: string, key: string): string {
  return join(folder, LEDGER_FOLDER, `${sha256(key, 16)}.json`);
}

/**
 * Publishes `content` as `<outbox>/<name>`, at most once per `key`. The ledger entry is written as
 * `pending` before the file and `done` after it: a process that dies in between leaves `pending`,
 * and the next attempt still knows what the file held before the first one replaced it. `owner`
 * (the run) is added to the entry's owners, so that undoing one run's publication leaves a file
 * that another run with the same key also published.
 */
export async function publishFile(
  outbox: string,
  name: string,
  content: string,
  key: string,
  owner?: string,
): Promise<Publication> {
  const ledger = ledgerPath(outbox, key);
  const entry = await readLedger(ledger);
  const owners = withOwner(entry?.owners, owner);
  if (entry?.status === 'done') {
    if (owners && owners.length !== entry.owners?.length) {
      await writeAtomic(ledger, JSON.stringify({ ...entry, owners }));
    }
    return entry.result;
  }
  await mkdir(dirname(ledger), { recursive: true });
  const path = join(outbox, name);
  const result: Publication = {
    path,
    bytes: Buffer.byteLength(content),
    sha256: sha256(content),
    replaced: entry ? entry.result.replaced : await readIfExists(path),
  };
  if (!entry) {
    await writeAtomic(ledger, JSON.stringify({ key, status: 'pending', result, owners }));
  }
  await writeAtomic(path, content);
  await writeAtomic(ledger, JSON.stringify({ key, status: 'done', result, owners }));
  return result;
}

function withOwner(owners: string[] | undefined, owner: string | undefined) {
  if (owner === undefined) return owners;
  return owners?.includes(owner) ? owners : [...(owners ?? []), owner];
}

/**
 * Undoes {@link publishFile}: puts back the previous content, or removes the file when there was
 * none. A file edited since publication is left alone and reported, so rollback never destroys
 * someone's work. While another run still owns the publication, only `owner` is taken off it.
 * Safe to call again after it succeeded (or died half-way).
 */
export async function retractFile(result: Publication, key: string, owner?: string): Promise<void> {
  const ledger = ledgerPath(dirname(result.path), key);
  const entry = await readLedger(ledger);
  const others = entry?.owners?.filter((o) => o !== owner) ?? [];
  if (owner !== undefined && others.length > 0) {
    await writeAtomic(ledger, JSON.stringify({ ...entry, owners: others }));
    return;
  }
  const current = await readIfExists(result.path);
  if (current !== null && sha256(current) === result.sha256) {
    if (result.replaced === null) await rm(result.path, { force: true });
    else await writeAtomic(result.path, result.replaced);
  } else if (current !== null && current !== result.replaced) {
    throw new TerminalError(
      `${result.path} was edited after publication and was left alone; restore or remove it by ` +
        `hand, then roll back again.`,
    );
  }
  await rm(ledger, { force: true });
}

async function readLedger(path: string): Promise<LedgerEntry | null> {
  const text = await readIfExists(path);
  if (text === null) return null;
  try {
    return JSON.parse(text) as LedgerEntry;
  } catch (error) {
    throw new TerminalError(
      `The publication ledger entry ${path} is not valid JSON; remove it by hand.`,
      {
        cause: error,
      },
    );
  }
}

async function readIfExists(path: string): Promise<string | null> {
  try {
    return await readFile(path, 'utf8');
  } catch (error) {
    if ((error as NodeJS.ErrnoException).code === 'ENOENT') return null;
    throw error;
  }
}

/** Readers see the old file or the new one, never a partial write: rename is atomic. */
async function writeAtomic(path: string, content: string): Promise<void> {
  await mkdir(dirname(path), { recursive: true });
  const temp = join(dirname(path), `.${basename(path)}.${randomBytes(6).toString('hex')}.tmp`);
  try {
    const handle = await open(temp, 'w');
    try {
      await handle.writeFile(content, 'utf8');
      await handle.sync();
    } finally {
      await handle.close();
    }
    await rename(temp, path);
  } catch (error) {
    await rm(temp, { force: true });
    throw error;
  }
}
