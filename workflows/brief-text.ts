/**
 * The text functions of the `brief` workflow: Markdown to passages, passages to sentences, and the
 * overlap scores that rank them. All of them are pure (no I/O, no clock, no randomness), so the
 * same documents and topic give the same brief on every run, which keeps the publish key stable.
 */
import { createHash } from 'node:crypto';
import { textTerms as tokenize } from 'keel';

/** A paragraph (or list item) of a Markdown file, with where it came from. */
export type Passage = {
  /** Path relative to the docs folder, with `/` separators. */
  file: string;
  /** The nearest heading above it; empty before the first heading. */
  heading: string;
  /** 1-based line of its first line. */
  line: number;
  /** Its text without Markdown markup; one source line per `\n`, so sentences can be located. */
  text: string;
  /** Distinct topic terms it contains. */
  score: number;
};

/** A sentence taken from a passage, scored against the topic, with its citation. */
export type Finding = {
  text: string;
  file: string;
  line: number;
  heading: string;
  score: number;
  /** Its position within its passage, to order sentences that share a line. */
  seq: number;
};

/** The plain statement of how the findings were chosen; every brief carries it. */
export const METHOD_LINE =
  'The findings were extracted offline: sentences from the documents were ranked by how many ' +
  "of the topic's terms they share, and are quoted as written.";

/** Who wrote the summary, as the brief says it. */
export type Summary = {
  text: string;
  /** True when no LLM tier answered and the offline tier extracted the summary instead. */
  degraded: boolean;
  provider: string;
  model: string;
  tier: string;
};

/** The line under a summary that says who or what wrote it. */
export function summaryLine(summary: Summary): string {
  return summary.degraded
    ? 'Summary extracted offline (degraded): no language model tier answered, so sentences were picked from the findings instead of written.'
    : `Summary written by ${summary.model} (${summary.provider}, tier ${summary.tier}) from the findings below.`;
}

/** The summary when no model wrote one: the best findings (they come best first), numbered. */
export function offlineSummary(findings: readonly Readonly<Finding>[], count = 3): string {
  return findings
    .slice(0, count)
    .map((f, i) => `${f.text} [${i + 1}]`)
    .join(' ');
}

/** The request that asks a model for the summary: the topic and the numbered findings. */
export function summaryPrompt(
  topic: string,
  findings: readonly Readonly<Finding>[],
): { system: string; user: string } {
  return {
    system:
      'You write the summary of a short research brief. Use only the numbered findings you are ' +
      'given, cite each claim with its number in brackets, e.g. [2], and answer in two to four ' +
      'plain sentences with no preamble and no headings.',
    user: [
      `Topic: ${topic}`,
      '',
      'Findings:',
      ...findings.map((f, i) => `[${i + 1}] ${f.text} (${f.file}:${f.line})`),
    ].join('\n'),
  };
}

/** Findings more alike than this (Jaccard similarity of their token sets) count as one. */
export const DUPLICATE_THRESHOLD = 0.8;

/** Sentences shorter than this many words are headings or fragments, not findings. */
const MIN_SENTENCE_WORDS = 4;

/**
 * Words as terms: lowercased, stemmed ("resumes", "resumed" and "resuming" meet "resume"),
 * stopwords left out. The same rules as the engine's offline LLM tier, so that the two agree on
 * what a sentence is about.
 */
export { stem, textTerms as tokenize } from 'keel';
/** The distinct terms of a topic, in order of first appearance. */
export function topicTerms(topic: string): string[] {
  return [...new Set(tokenize(topic))];
}

/** How many of `terms` occur among `tokens`, each counted once. */
export function overlap(tokens: readonly string[], terms: readonly string[]): number {
  const present = new Set(tokens);
  return terms.filter((t) => present.has(t)).length;
}

/** |A ∩ B| / |A ∪ B| of two token lists taken as sets; two empty lists are identical (1). */
export function jaccard(a: readonly string[], b: readonly string[]): number {
  const left = new Set(a);
  const right = new Set(b);
  let shared = 0;
  for (const token of left) if (right.has(token)) shared += 1;
  const union = left.size + right.size - shared;
  return union === 0 ? 1 : shared / union;
}

/** A file-name-safe form of `text`: lowercase ASCII words joined by "-", at most 60 characters. */
export function slug(text: string): string {
  const words = text
    .normalize('NFKD')
    .replace(/[\u0300-\u036f]/g, '')
    .toLowerCase()
    .replace(/['\u2019]/g, '')
    .split(/[^a-z0-9]+/)
    .filter(Boolean);
  let out = '';
  for (const word of words) {
    const next = out ? `${out}-${word}` : word;
    if (next.length > 60) break;
    out = next;
  }
  // A first word longer than the limit would otherwise leave nothing.
  return out || words[0]?.slice(0, 60) || 'brief';
}

/** The sha256 of `content` in hex, cut to `length` characters when given. */
export function sha256(content: string | Uint8Array, length?: number): string {
  const hex = createHash('sha256').update(content).digest('hex');
  return length === undefined ? hex : hex.slice(0, length);
}

/**
 * Removes inline Markdown (links, images, code spans, emphasis, HTML tags) from one line. Code spans
 * keep their text verbatim: `brief-<slug>.md` must not lose `<slug>` as if it were a tag.
 */
export function stripInline(line: string): string {
  const code: string[] = [];
  const prose = line.replace(/(`+)(.*?)\1/g, (_m, _ticks, text: string) => {
    code.push(text.trim());
    return `\uE000${code.length - 1}\uE000`;
  });
  return prose
    .replace(/<!--.*?-->/g, '')
    .replace(/!\[([^\]]*)\]\([^)]*\)/g, '$1')
    .replace(/\[([^\]]+)\]\([^)]*\)/g, '$1')
    .replace(/\[([^\]]+)\]\[[^\]]*\]/g, '$1')
    .replace(/<(https?:\/\/[^>]+)>/g, '$1')
    .replace(/<\/?[a-zA-Z][^>]*>/g, '')
    .replace(/(\*\*|__)(?=\S)(.+?)(?<=\S)\1/g, '$2')
    .replace(/\*(?=\S)([^*]+?)(?<=\S)\*/g, '$1')
    .replace(/\uE000(\d+)\uE000/g, (_m, i: string) => code[Number(i)] ?? '')
    .replace(/\s+/g, ' ')
    .trim();
}

const FENCE = /^\s{0,3}(```|~~~)/;
const ATX_HEADING = /^\s{0,3}#{1,6}\s+(.*?)\s*#*\s*$/;
const SETEXT_UNDERLINE = /^\s{0,3}(=+|-+)\s*$/;
const THEMATIC_BREAK = /^\s{0,3}([-*_])(\s*\1){2,}\s*$/;
const LIST_ITEM = /^\s*(?:[-*+]|\d+[.)])\s+/;
const QUOTE = /^\s*(?:>\s?)+/;

/**
 * Splits a Markdown file into passages: paragraphs, and each list item on its own. Headings become
 * the `heading` of what follows them; code blocks, tables and front matter are not prose and are
 * skipped. Scores are left at 0 for {@link scorePassages}.
 */
export function splitPassages(markdown: string, file: string): Passage[] {
  const lines = markdown.replace(/\r\n?/g, '\n').split('\n');
  const passages: Passage[] = [];
  let heading = '';
  let block: { line: number; parts: string[] } | null = null;
  let fence: string | null = null;
  let blankBefore = true;
  let lastWasList = false;

  const flush = () => {
    if (block) {
      const text = block.parts.join('\n');
      if (/[a-zA-Z0-9]/.test(text)) {
        passages.push({ file, heading, line: block.line, text, score: 0 });
      }
    }
    block = null;
  };

  let start = 0;
  if (lines[0]?.trim() === '---') {
    const end = lines.indexOf('---', 1);
    if (end > 0) start = end + 1;
  }

  for (let i = start; i < lines.length; i++) {
    const raw = lines[i]!;
    const lineNo = i + 1;
    if (fence) {
      if (raw.trim().startsWith(fence)) fence = null;
      continue;
    }
    const opening = FENCE.exec(raw);
    if (opening) {
      flush();
      fence = opening[1]!;
      blankBefore = false;
      continue;
    }
    if (raw.trim() === '') {
      flush();
      blankBefore = true;
      continue;
    }
    const atx = ATX_HEADING.exec(raw);
    if (atx) {
      flush();
      heading = stripInline(atx[1]!);
      blankBefore = false;
      lastWasList = false;
      continue;
    }
    if (SETEXT_UNDERLINE.test(raw) && block?.parts.length === 1 && !lastWasList) {
      heading = block.parts[0]!;
      block = null;
      blankBefore = false;
      continue;
    }
    if (THEMATIC_BREAK.test(raw)) {
      flush();
      continue;
    }
    if (/^\s*\|/.test(raw)) {
      flush();
      continue;
    }
    // An indented block after a blank line is code, unless it continues a list item.
    if (blankBefore && !lastWasList && /^( {4}|\t)/.test(raw)) continue;

    const isItem = LIST_ITEM.test(raw);
    if (isItem || blankBefore) {
      flush();
      lastWasList = isItem || (lastWasList && /^\s+/.test(raw));
    }
    const text = stripInline(raw.replace(QUOTE, '').replace(LIST_ITEM, ''));
    if (!block) block = { line: lineNo, parts: [] };
    block.parts.push(text);
    blankBefore = false;
  }
  flush();
  return passages;
}

/** A sentence of a passage and the offset where it starts. */
export type Sentence = { text: string; offset: number };

/**
 * Splits text at ".", "!" or "?" followed by space and a capital letter or digit, so that "e.g. a"
 * and "keel.db" do not end a sentence. Whitespace inside each sentence is collapsed.
 */
export function splitSentences(text: string): Sentence[] {
  const sentences: Sentence[] = [];
  const boundary = /[.!?]["')\]]*\s+(?=["'(`[]?[A-Z0-9])/g;
  let start = 0;
  const push = (end: number) => {
    const piece = text.slice(start, end);
    const lead = piece.length - piece.trimStart().length;
    const clean = piece.replace(/\s+/g, ' ').trim();
    if (clean) sentences.push({ text: clean, offset: start + lead });
  };
  for (let m = boundary.exec(text); m; m = boundary.exec(text)) {
    const end = m.index + m[0].trimEnd().length;
    push(end);
    start = m.index + m[0].length;
  }
  push(text.length);
  return sentences;
}

/** Scores passages by {@link overlap} with `terms`, in place, and returns them. */
export function scorePassages(passages: Passage[], terms: readonly string[]): Passage[] {
  for (const p of passages) p.score = overlap(tokenize(p.text), terms);
  return passages;
}

/** Orders by source: file path, then line, then position within the passage. */
export function bySource(
  a: Pick<Finding, 'file' | 'line'> & { seq?: number },
  b: Pick<Finding, 'file' | 'line'> & { seq?: number },
): number {
  if (a.file !== b.file) return a.file < b.file ? -1 : 1;
  return a.line - b.line || (a.seq ?? 0) - (b.seq ?? 0);
}

/** Highest score first; equal scores keep source order, so the ranking never depends on chance. */
export function byScore<T extends Pick<Finding, 'file' | 'line' | 'score'> & { seq?: number }>(
  a: T,
  b: T,
): number {
  return b.score - a.score || bySource(a, b);
}

/** The `max` passages that share the most terms with the topic; those sharing none are left out. */
export function topPassages(passages: readonly Passage[], max: number): Passage[] {
  return passages
    .filter((p) => p.score > 0)
    .sort(byScore)
    .slice(0, max);
}

/** The sentences of a passage that share at least one term with the topic, as findings. */
export function passageSentences(passage: Readonly<Passage>, terms: readonly string[]): Finding[] {
  const findings: Finding[] = [];
  for (const [seq, sentence] of splitSentences(passage.text).entries()) {
    if (sentence.text.split(' ').length < MIN_SENTENCE_WORDS) continue;
    const score = overlap(tokenize(sentence.text), terms);
    if (score === 0) continue;
    const line = passage.line + countNewlines(passage.text.slice(0, sentence.offset));
    findings.push({
      text: sentence.text,
      file: passage.file,
      line,
      heading: passage.heading,
      score,
      seq,
    });
  }
  return findings;
}

function countNewlines(text: string): number {
  let n = 0;
  for (const ch of text) if (ch === '\n') n += 1;
  return n;
}

/**
 * Keeps, in ranked order, each item unless it is a near-duplicate (Jaccard similarity of tokens
 * above `threshold`) of one kept before it: the better-ranked wording of a repeated sentence wins.
 */
export function dropNearDuplicates<T extends { text: string }>(
  ranked: readonly T[],
  threshold = DUPLICATE_THRESHOLD,
): T[] {
  const kept: { item: T; tokens: string[] }[] = [];
  for (const item of ranked) {
    const tokens = tokenize(item.text);
    if (kept.every((k) => jaccard(k.tokens, tokens) <= threshold)) kept.push({ item, tokens });
  }
  return kept.map((k) => k.item);
}

/** Ranks candidate sentences, drops near-duplicates and keeps the first `max`, as fresh objects. */
export function selectFindings(candidates: readonly Readonly<Finding>[], max: number): Finding[] {
  const ranked = candidates.map((c) => ({ ...c })).sort(byScore);
  return dropNearDuplicates(ranked).slice(0, max);
}

/** What {@link renderBrief} needs. */
export type BriefContent = {
  topic: string;
  findings: readonly Readonly<Finding>[];
  summary?: Readonly<Summary>;
};

/** The brief as Markdown: title, topic, how it was made, findings with citations, sources. */
export function renderBrief({ topic, findings, summary }: BriefContent): string {
  const lines = ['# Research brief', '', `**Topic:** ${topic}`, ''];
  if (summary) {
    lines.push('## Summary', '', summary.text.trim(), '', `_${summaryLine(summary)}_`, '');
  }
  lines.push(`_${METHOD_LINE}_`, '');
  lines.push('## Findings', '');
  if (findings.length === 0) {
    lines.push('- No sentence in the documents shares a term with the topic.');
  }
  for (const f of findings) lines.push(`- ${f.text} (${f.file}:${f.line})`);
  lines.push('', '## Sources', '');
  const cited = new Map<string, Set<number>>();
  for (const f of findings) cited.set(f.file, (cited.get(f.file) ?? new Set()).add(f.line));
  for (const file of [...cited.keys()].sort()) {
    const lineNumbers = [...cited.get(file)!].sort((a, b) => a - b);
    const label = lineNumbers.length > 1 ? 'lines' : 'line';
    lines.push(`- ${file} (${label} ${lineNumbers.join(', ')})`);
  }
  if (cited.size === 0) lines.push('- None.');
  return `${lines.join('\n')}\n`;
}
