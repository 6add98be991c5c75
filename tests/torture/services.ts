/**
 * The outside world of a torture run, on 127.0.0.1: a sink that applies effects and compensations
 * and honours their keys, and a fake OpenAI server that answers each prompt with a text derived
 * from it.
 *
 * Both watch for what must never happen. When a `judge` is given, a second call for an effect key
 * (or a second request for a prompt) is checked against the database of the run it belongs to, at
 * the moment it arrives: if the first outcome is already recorded there, the engine repeated work
 * it had the record of, and that is counted as a violation.
 */
import Database from 'better-sqlite3';
import { createServer, type Server } from 'node:http';
import type { AddressInfo } from 'node:net';
import { startFakeOpenAI, type FakeOpenAI } from '../support/fake-openai.ts';

/** Effect statuses that mean the outcome of `run` is recorded. */
const RECORDED = ['done', 'reconciled', 'compensating', 'compensated', 'compensation_failed'];

export type Applied = { id: string; key: string; value: unknown; calls: number };

export type Compensation = {
  id: string;
  key: string;
  effect: string;
  calls: number;
  done: boolean;
};

/** Finds the database that holds the run with input id `id`, for the checks at arrival. */
export type Judge = (id: string) => Database.Database | undefined;

export type Services = {
  sinkUrl: string;
  llmUrl: string;
  applied: Map<string, Applied>;
  compensations: Map<string, Compensation>;
  /** Prompts answered, by prompt, with how many times each was asked. */
  prompts: Map<string, number>;
  /** What must never happen, each with what was seen. */
  violations: string[];
  /** Calls of an effect's `run` after the first, each before its record (allowed). */
  reruns: number;
  /** `stuck` compensations of these input ids never succeed. */
  stuck: Set<string>;
  close(): Promise<void>;
};

export const answerTo = (prompt: string) => `A<${prompt}>`;

export async function startServices(judge?: Judge): Promise<Services> {
  const applied = new Map<string, Applied>();
  const compensations = new Map<string, Compensation>();
  const prompts = new Map<string, number>();
  const violations: string[] = [];
  const stuck = new Set<string>();
  let reruns = 0;

  const effectStatus = (id: string, key: string): string | undefined => {
    const db = judge?.(id);
    if (!db) return undefined;
    const row = db.prepare('SELECT status FROM effects WHERE key = ?').get(key) as
      { status: string } | undefined;
    return row?.status;
  };

  const onApply = (body: { id: string; key: string; value: unknown }) => {
    const seen = applied.get(body.key);
    if (!seen) {
      applied.set(body.key, { ...body, calls: 1 });
      return { receipt: `r:${body.key}` };
    }
    seen.calls += 1;
    reruns += 1;
    const status = effectStatus(body.id, body.key);
    if (status !== undefined && RECORDED.includes(status)) {
      violations.push(
        `effect ${body.key} was run again after its outcome was recorded (${status})`,
      );
    }
    if (JSON.stringify(seen.value) !== JSON.stringify(body.value)) {
      violations.push(
        `effect ${body.key} was run again with another value: ${JSON.stringify(seen.value)}, then ${JSON.stringify(body.value)}`,
      );
    }
    return { receipt: `r:${body.key}` };
  };

  const onCompensate = (body: { id: string; key: string; effect: string }) => {
    const c = compensations.get(body.key) ?? { ...body, calls: 0, done: false };
    compensations.set(body.key, c);
    c.calls += 1;
    if (effectStatus(body.id, body.key) === 'compensated') {
      violations.push(`the compensation of ${body.key} ran again after it was recorded`);
    }
    if (!applied.has(body.key)) {
      violations.push(`the compensation of ${body.key} ran for an effect the sink never applied`);
    }
    const fails = (body.effect === 'reserve' && stuck.has(body.id)) || c.calls <= 2;
    if (fails) return undefined;
    c.done = true;
    return { receipt: `undone:${body.key}` };
  };

  const sink: Server = createServer((req, res) => {
    const chunks: Buffer[] = [];
    req.on('data', (c: Buffer) => chunks.push(c));
    req.on('end', () => {
      const body = JSON.parse(Buffer.concat(chunks).toString('utf8')) as {
        id: string;
        key: string;
        value: unknown;
        effect: string;
      };
      const answer = req.url === '/apply' ? onApply(body) : onCompensate(body);
      if (answer === undefined) {
        res.writeHead(503, { 'content-type': 'text/plain' }).end('not this time');
        return;
      }
      res.writeHead(200, { 'content-type': 'application/json' }).end(JSON.stringify(answer));
    });
  });
  // Longer than any pause between two calls of one process: a keep-alive connection the server
  // closes just as a client sends on it fails that call, a fault of this sink, not of keel.
  sink.keepAliveTimeout = 120_000;
  await new Promise<void>((resolve) => sink.listen(0, '127.0.0.1', resolve));

  const llm: FakeOpenAI = await startFakeOpenAI();
  llm.otherwise((request) => {
    const body = request.body as { messages?: { content?: string }[] };
    const prompt = body.messages?.at(-1)?.content ?? '';
    const asked = (prompts.get(prompt) ?? 0) + 1;
    prompts.set(prompt, asked);
    const id = prompt.split('|')[0] ?? '';
    const db = asked > 1 ? judge?.(id) : undefined;
    if (db) {
      const row = db
        .prepare(
          "SELECT count(*) AS n FROM llm_calls WHERE status = 'completed' AND instr(response, ?) > 0",
        )
        .get(answerTo(prompt)) as { n: number };
      if (row.n > 0) {
        violations.push(`the prompt "${prompt}" was sent again after its answer was recorded`);
      }
    }
    return { text: answerTo(prompt), usage: { promptTokens: 12, completionTokens: 4 } };
  });

  return {
    sinkUrl: `http://127.0.0.1:${(sink.address() as AddressInfo).port}`,
    llmUrl: llm.url,
    applied,
    compensations,
    prompts,
    violations,
    get reruns() {
      return reruns;
    },
    stuck,
    async close() {
      sink.closeAllConnections();
      await new Promise<void>((resolve) => sink.close(() => resolve()));
      await llm.close();
    },
  };
}
