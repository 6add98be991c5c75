/**
 * The `refine` workflow: a loop in the graph. It drafts a paragraph on a topic, reviews it, and
 * revises it until its score reaches the target or it runs out of rounds:
 *
 *   draft → review ⇄ revise
 *             ↓
 *           finish
 *
 * `.route` picks the step after `review` from the state, and sends `revise` back to `review`. Each
 * pass through the loop is a separate, checkpointed step execution, so a crash resumes at the round
 * it was in. The review is deterministic (keyword coverage and length), so every run of the same
 * input takes the same path.
 *
 * Run it (every input is optional):
 *
 *   keel run workflows/refine.ts
 *   keel run workflows/refine.ts --input '{"topic":"leases","mustMention":["lease","expiry"]}'
 */
import { workflow, type CompleteWorkflow } from 'keel';
import { overlap, topicTerms, tokenize } from './brief-text.ts';

/** The state of a `refine` run: the first five fields are its input, the rest are set by steps. */
export type Refine = {
  /** What the text is about (default "durable workflows"). */
  topic?: string;
  /** Words the text must cover; inflected forms count ("crashes" covers "crash"). */
  mustMention?: string[];
  /** Score (0-100) that ends the loop (default 90). */
  target?: number;
  /** Revisions allowed before the text is taken as it is (default 5). */
  maxRounds?: number;
  /** Length, in words, that earns the full length part of the score (default 40). */
  minWords?: number;
  text?: string;
  score?: number;
  /** Terms of `mustMention` the text does not cover yet. */
  missing?: string[];
  /** Revisions made so far. */
  rounds?: number;
  /** One entry per review, in order. */
  history?: { round: number; score: number; words: number; missing: string[] }[];
  /** The outcome, set by `finish`. */
  result?: { text: string; score: number; rounds: number; reachedTarget: boolean };
};

/** {@link Refine}'s input fields, defaults applied. */
export type RefineSettings = Required<
  Pick<Refine, 'topic' | 'mustMention' | 'target' | 'maxRounds' | 'minWords'>
>;

/** The input with its defaults applied. */
export function refineSettings(state: Readonly<Refine>): RefineSettings {
  return {
    topic: state.topic ?? 'durable workflows',
    mustMention: state.mustMention ?? ['checkpoint', 'crash', 'resume', 'effect'],
    target: state.target ?? 90,
    maxRounds: state.maxRounds ?? 5,
    minWords: state.minWords ?? 40,
  };
}

/**
 * Scores a text from 0 to 100: 70 points for covering the required words, 30 for reaching
 * `minWords`, each in proportion. Also returns the words still missing, in the order required.
 */
export function reviewText(
  text: string,
  mustMention: readonly string[],
  minWords: number,
): { score: number; words: number; missing: string[] } {
  const tokens = tokenize(text);
  const missing = mustMention.filter((word) => overlap(tokens, topicTerms(word)) === 0);
  const coverage = mustMention.length === 0 ? 1 : 1 - missing.length / mustMention.length;
  const words = text.split(/\s+/).filter(Boolean).length;
  const length = minWords <= 0 ? 1 : Math.min(1, words / minWords);
  return { score: Math.round(70 * coverage + 30 * length), words, missing };
}

/** Sentences `revise` adds when every required word is covered but the text is still short. */
const ELABORATIONS = [
  'Each step commits its changes before the next one starts, so finished work is never repeated.',
  'Side effects carry keys, which lets the outside system ignore a request it has already seen.',
  'A rollback runs the compensations newest first and can itself be resumed if it stops.',
];

/** Whether the loop is over: the text is good enough, or no rounds are left. */
export function isDone(state: Readonly<Refine>): boolean {
  const { target, maxRounds } = refineSettings(state);
  return (state.score ?? 0) >= target || (state.rounds ?? 0) >= maxRounds;
}

/** `refine`: draft → review ⇄ revise → finish. See the top of this file. */
export default workflow<Refine>('refine', {
  version: 1,
  description: 'Revises a text until a deterministic review scores it high enough.',
})
  .step('draft', (state) => {
    const input = refineSettings(state);
    if (typeof input.topic !== 'string' || !Array.isArray(input.mustMention)) {
      throw new Error('Invalid input: "topic" must be a string and "mustMention" a list of words.');
    }
    // Recorded so that every later step, and a resumed run, reads the same values.
    Object.assign(state, input);
    state.text = `A first draft about ${input.topic}.`;
    state.rounds = 0;
    state.history = [];
  })
  .step('review', (state) => {
    const { mustMention, minWords } = refineSettings(state);
    const review = reviewText(state.text ?? '', mustMention, minWords);
    state.score = review.score;
    state.missing = review.missing;
    (state.history ??= []).push({ round: state.rounds ?? 0, ...review });
  })
  .route('review', (state) => (isDone(state) ? 'finish' : 'revise'), ['finish', 'revise'])
  .step('revise', (state) => {
    const round = (state.rounds ?? 0) + 1;
    const word = state.missing?.[0];
    // One change per round, the most valuable first, so the history shows the score climbing.
    const addition = word
      ? `It also covers ${word}.`
      : (ELABORATIONS.find((sentence) => !state.text?.includes(sentence)) ??
        ELABORATIONS[round % ELABORATIONS.length]!);
    state.text = `${state.text ?? ''} ${addition}`.trim();
    state.rounds = round;
  })
  .route('revise', () => 'review', ['review'])
  .step('finish', (state) => {
    const { target } = refineSettings(state);
    const score = state.score ?? 0;
    state.result = {
      text: state.text ?? '',
      score,
      rounds: state.rounds ?? 0,
      reachedTarget: score >= target,
    };
  }) satisfies CompleteWorkflow<Refine>;
