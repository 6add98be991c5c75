/**
 * The degraded tier: an offline "provider" that answers without a language model, by extracting
 * the sentences of the request that share the most terms with what was asked. It is the last tier
 * of the default chain, so a workflow still gets an answer (marked `degraded: true`) when no
 * provider is reachable. Pure and deterministic: the same request always gives the same text; the
 * only time read is the latency, through a {@link Clock}.
 *
 * Its text rules (stopwords, light stemming, sentence boundaries, overlap, near-duplicates) are
 * those of the `brief` workflow's extractive method, so both rank sentences alike.
 */
import { systemClock, type Clock } from '../time.ts';
import type {
  LlmProvider,
  LlmRequest,
  LlmResponse,
  ProviderFailure,
  ProviderStreamEvent,
  StopReason,
} from './types.ts';

export const DEGRADED_PROVIDER = 'degraded';
export const DEGRADED_MODEL = 'extractive';

/** Characters of answer allowed per requested token: about four characters make a token. */
export const CHARS_PER_TOKEN = 4;

/** Sentences shorter than this many words are headings or fragments, not answers. */
const MIN_SENTENCE_WORDS = 4;

/** Sentences more alike than this (Jaccard similarity of their terms) count as one. */
const DUPLICATE_THRESHOLD = 0.8;

/** How many text events {@link DegradedProvider.stream} splits an answer into, at most. */
const STREAM_DELTAS = 4;

const STOPWORDS = new Set(
  (
    'a about after all also an and any are as at be been before being but by can could did do ' +
    'does doing done down each every for from had has have he her here him his how i if in into ' +
    'is it its just may me might more most must my no not of off on one only onto or other our ' +
    'out over own same she should so some such than that the their them then there these they ' +
    'this those to too under up us very was we were what when where which while who whom whose ' +
    'why will with would you your'
  ).split(' '),
);

const hasVowel = (stem: string) => /[aeiouy]/.test(stem);

/** "stopp" -> "stop", but "call" and "pass" keep their double letter, as does a short stem. */
function undouble(stem: string): string {
  const last = stem.at(-1);
  const doubled = last !== undefined && last === stem.at(-2) && !'aeiouylsz'.includes(last);
  return doubled && stem.length > 3 ? stem.slice(0, -1) : stem;
}

/**
 * Light suffix stripping, so that "resumes", "resumed" and "resuming" meet "resume". Not a real
 * stemmer: it only has to be consistent, since the question and the material go through it alike.
 */
export function stem(word: string): string {
  let w = word;
  if (w.length > 4 && /ie[sd]$/.test(w)) return `${w.slice(0, -3)}y`;
  if (w.length > 5 && w.endsWith('ing') && hasVowel(w.slice(0, -3))) {
    w = undouble(w.slice(0, -3));
  } else if (w.length > 4 && w.endsWith('ed') && !w.endsWith('eed') && hasVowel(w.slice(0, -2))) {
    w = undouble(w.slice(0, -2));
  } else if (w.length > 3 && w.endsWith('s') && !/(ss|us|is)$/.test(w)) {
    w = w.slice(0, -1);
  }
  if (w.length > 4 && w.endsWith('e')) w = w.slice(0, -1);
  return w;
}

/** Lowercased, stemmed word tokens of `text`, stopwords and one-letter words left out. */
export function textTerms(text: string): string[] {
  return text
    .normalize('NFKD')
    .replace(/[\u0300-\u036f]/g, '')
    .toLowerCase()
    .replace(/['\u2019]/g, '')
    .split(/[^a-z0-9]+/)
    .filter((w) => w.length > 1 && !STOPWORDS.has(w))
    .map(stem);
}

/** Headings, list items and numbered references (`[3] ...`, as prompts list their sources). */
const BLOCK_START = /^\s{0,3}(?:#{1,6}\s+|[-*+]\s+|\d+[.)]\s+|\[\d+\]\s+)/;
const QUOTE = /^\s*(?:>\s?)+/;
const HEADING = /^\s{0,3}#{1,6}\s+/;

/**
 * The sentences of free text, in order. Blank lines, headings and list items start a new block, so
 * a heading without a full stop does not run into the sentence after it; within a block, a
 * sentence ends at ".", "!" or "?" followed by space and a capital letter or digit (so "e.g. a"
 * and "keel.db" do not end one). Whitespace inside a sentence is collapsed.
 */
export function splitIntoSentences(text: string): string[] {
  const blocks: string[] = [];
  let current: string[] = [];
  const flush = () => {
    if (current.length) blocks.push(current.join('\n'));
    current = [];
  };
  for (const raw of text.replace(/\r\n?/g, '\n').split('\n')) {
    const line = raw.replace(QUOTE, '');
    if (line.trim() === '') {
      flush();
      continue;
    }
    if (BLOCK_START.test(line)) flush();
    current.push(line.replace(BLOCK_START, ''));
    if (HEADING.test(line)) flush();
  }
  flush();
  const sentences: string[] = [];
  const boundary = /[.!?]["')\]]*\s+(?=["'(`[]?[A-Z0-9])/g;
  for (const block of blocks) {
    let start = 0;
    const push = (end: number) => {
      const clean = block.slice(start, end).replace(/\s+/g, ' ').trim();
      if (clean) sentences.push(clean);
    };
    for (let m = boundary.exec(block); m; m = boundary.exec(block)) {
      push(m.index + m[0].trimEnd().length);
      start = m.index + m[0].length;
    }
    push(block.length);
  }
  return sentences;
}

function jaccard(a: ReadonlySet<string>, b: ReadonlySet<string>): number {
  let shared = 0;
  for (const token of a) if (b.has(token)) shared += 1;
  const union = a.size + b.size - shared;
  return union === 0 ? 1 : shared / union;
}

/** The text of a message's content: its text parts and tool results (images carry no text). */
function messageText(content: LlmRequest['messages'][number]['content']): string[] {
  if (typeof content === 'string') return [content];
  return content.flatMap((part) => {
    if (part.type === 'text') return [part.text];
    if (part.type === 'tool_result') return [part.content];
    return [];
  });
}

/**
 * The terms a request is about: those of its system prompt and of its last user message's own text
 * (not its tool results, which are material to answer from, not the question). Distinct, in order
 * of first appearance.
 */
export function salientTerms(request: LlmRequest): string[] {
  const lastUser = request.messages.findLast((m) => m.role === 'user');
  const asked =
    lastUser === undefined
      ? []
      : typeof lastUser.content === 'string'
        ? [lastUser.content]
        : lastUser.content.flatMap((part) => (part.type === 'text' ? [part.text] : []));
  return [...new Set([request.system ?? '', ...asked].flatMap(textTerms))];
}

type Candidate = { text: string; order: number; score: number; terms: Set<string> };

/** What the extraction kept, and whether it had to leave something out for lack of room. */
export type Extract = { text: string; cut: boolean };

/**
 * The extractive answer to a request: the sentences of its user messages (text and tool results)
 * ranked by how many {@link salientTerms} they share (ties in their original order), near-duplicates
 * and sentences sharing no term dropped, the best kept within `maxChars`, and put back in their
 * original order. Questions are not answers, so sentences ending in "?" are left out. When even the
 * best sentence is too long, it is cut at the last word that fits.
 */
export function extractAnswer(request: LlmRequest, maxChars: number): Extract {
  const terms = salientTerms(request);
  const candidates: Candidate[] = [];
  for (const message of request.messages) {
    if (message.role !== 'user') continue;
    for (const text of messageText(message.content)) {
      for (const sentence of splitIntoSentences(text)) {
        if (sentence.split(' ').length < MIN_SENTENCE_WORDS || sentence.endsWith('?')) continue;
        const own = new Set(textTerms(sentence));
        const score = terms.filter((t) => own.has(t)).length;
        if (score > 0)
          candidates.push({ text: sentence, order: candidates.length, score, terms: own });
      }
    }
  }
  const ranked = candidates.sort((a, b) => b.score - a.score || a.order - b.order);
  const distinct: Candidate[] = [];
  for (const c of ranked) {
    if (distinct.every((k) => jaccard(k.terms, c.terms) <= DUPLICATE_THRESHOLD)) distinct.push(c);
  }

  const kept: Candidate[] = [];
  let used = 0;
  let cut = false;
  for (const c of distinct) {
    const cost = c.text.length + (kept.length ? 1 : 0);
    if (used + cost <= maxChars) {
      kept.push(c);
      used += cost;
    } else {
      cut = true;
    }
  }
  const best = distinct[0];
  if (kept.length === 0 && best) return { text: cutAtWord(best.text, maxChars), cut: true };
  kept.sort((a, b) => a.order - b.order);
  return { text: kept.map((c) => c.text).join(' '), cut };
}

/** The longest prefix of `text` within `max` characters that ends at a word boundary. */
function cutAtWord(text: string, max: number): string {
  if (text.length <= max) return text;
  const head = text.slice(0, max);
  const space = head.lastIndexOf(' ');
  return (space > 0 ? head.slice(0, space) : head).trimEnd();
}

/** The text up to the first stop sequence it contains, if any. */
function applyStopSequences(text: string, stops: readonly string[] | undefined) {
  let end = -1;
  for (const stop of stops ?? []) {
    const at = stop === '' ? -1 : text.indexOf(stop);
    if (at >= 0 && (end < 0 || at < end)) end = at;
  }
  return end < 0 ? { text, stopped: false } : { text: text.slice(0, end), stopped: true };
}

/**
 * A request the degraded tier cannot honour: a JSON answer, or a forced tool call. Thrown with a
 * `failure` like every provider failure, so the router handles it with no special case.
 */
export class DegradedTierError extends Error {
  override name = 'DegradedTierError';
  readonly provider = DEGRADED_PROVIDER;
  readonly failure: ProviderFailure;

  constructor(message: string) {
    super(`${DEGRADED_PROVIDER}: ${message}`);
    // Status 404 classifies as `not_found`: "this tier cannot serve that", the same verdict as a
    // model a server does not have. The router then leaves the tier out of this call and moves on
    // (or reports no tier available), without counting it against the tier's breaker. A
    // `bad_request` would fail the call on every tier although a real model could answer it, and a
    // `server` class would open the breaker and keep the tier from the requests it can answer.
    this.failure = {
      status: 404,
      body: {
        error: { type: 'not_found_error', code: 'degraded_tier_unsupported', message },
      },
      message,
    };
  }
}

export type DegradedProviderOptions = {
  /**
   * A workflow's own offline method, used instead of the extraction. Its text is returned as is;
   * for a `json` request it must be a JSON object, or the request is refused.
   */
  answer?: (request: LlmRequest) => string;
  /** Reads the time for `latencyMs`; the system clock by default. */
  clock?: Pick<Clock, 'now'>;
};

export type DegradedProvider = LlmProvider & {
  stream(request: LlmRequest, signal?: AbortSignal): AsyncIterable<ProviderStreamEvent>;
};

/** Why the degraded tier cannot honour a request, or undefined when it can. */
function unsupported(request: LlmRequest, hasOwnMethod: boolean): string | undefined {
  const choice = request.toolChoice;
  if (choice === 'required') {
    return 'the degraded offline tier cannot call tools (tool choice "required")';
  }
  if (typeof choice === 'object') {
    return `the degraded offline tier cannot call tools (tool "${choice.name}" was required)`;
  }
  if (request.json && !hasOwnMethod) {
    return 'the degraded offline tier cannot answer in JSON: it only extracts sentences';
  }
  return undefined;
}

function isJsonObject(text: string): boolean {
  try {
    const value: unknown = JSON.parse(text);
    return typeof value === 'object' && value !== null && !Array.isArray(value);
  } catch {
    return false;
  }
}

/** The offline tier. See the module comment for what it answers and what it refuses. */
export function degradedProvider(options: DegradedProviderOptions = {}): DegradedProvider {
  const clock = options.clock ?? systemClock;

  function answer(request: LlmRequest, signal?: AbortSignal): LlmResponse {
    signal?.throwIfAborted();
    const started = clock.now();
    const refusal = unsupported(request, options.answer !== undefined);
    if (refusal) throw new DegradedTierError(refusal);
    let text: string;
    let stopReason: StopReason = 'end';
    if (options.answer) {
      text = options.answer(request);
      if (request.json && !isJsonObject(text)) {
        throw new DegradedTierError(
          'the degraded offline tier cannot answer in JSON: its method gave no JSON object',
        );
      }
    } else {
      const extract = extractAnswer(request, Math.max(0, request.maxTokens) * CHARS_PER_TOKEN);
      text = extract.text;
      if (extract.cut) stopReason = 'max_tokens';
    }
    const stopped = applyStopSequences(text, request.stopSequences);
    if (stopped.stopped) stopReason = 'stop_sequence';
    return {
      text: stopped.text,
      toolCalls: [],
      stopReason,
      usage: { inputTokens: 0, outputTokens: 0 },
      provider: DEGRADED_PROVIDER,
      model: DEGRADED_MODEL,
      tier: '',
      degraded: true,
      latencyMs: Math.max(0, clock.now() - started),
    };
  }

  return {
    name: DEGRADED_PROVIDER,
    model: DEGRADED_MODEL,
    async complete(request, signal) {
      return answer(request, signal);
    },
    async *stream(request, signal) {
      const response = answer(request, signal);
      for (const text of deltasOf(response.text, STREAM_DELTAS)) {
        signal?.throwIfAborted();
        yield { type: 'text', text };
      }
      yield { type: 'done', response };
    },
  };
}

/** `text` in at most `count` pieces cut after whitespace; joined, they give `text` back exactly. */
export function deltasOf(text: string, count: number): string[] {
  const words = text.match(/\s*\S+\s*/g) ?? (text ? [text] : []);
  const size = Math.max(1, Math.ceil(words.length / count));
  const out: string[] = [];
  for (let i = 0; i < words.length; i += size) out.push(words.slice(i, i + size).join(''));
  return out;
}
