/**
 * LLM tiers from configuration: the `llm` section of `keel.config.json`, validated with errors that
 * name the field and say what to do, turned into router tiers over the provider adapters. With no
 * tiers configured, the default chain is built from the environment: Anthropic, OpenAI, a local
 * OpenAI-compatible server that answers a probe, then the offline degraded tier.
 *
 * Keys never live in configuration: a tier names the environment variable that holds its key
 * (`apiKeyEnv`), and anything in the file that looks like a key is refused. Notes and errors name
 * variables, never their values.
 */
import { existsSync, readFileSync } from 'node:fs';
import { resolve } from 'node:path';
import { InputError } from '../../engine/errors.ts';
import { degradedProvider } from '../../engine/llm/degraded.ts';
import type { RouterTier } from '../../engine/llm/router.ts';
import type { LlmProvider, TierPrice } from '../../engine/llm/types.ts';
import { anthropicProvider } from './anthropic.ts';
import { openaiProvider, PRESETS } from './openai.ts';

export const PROVIDER_KINDS = [
  'anthropic',
  'openai',
  'ollama',
  'lmstudio',
  'gemini',
  'xai',
  'openai-compatible',
  'degraded',
] as const;
export type ProviderKind = (typeof PROVIDER_KINDS)[number];

export type TierConfig = {
  /** The tier's name in logs, `keel show` and `keel doctor`; its provider's name by default. */
  name?: string;
  provider: ProviderKind;
  model?: string;
  baseURL?: string;
  /** The environment variable holding the key (never the key itself). */
  apiKeyEnv?: string;
  contextWindow?: number;
  price?: TierPrice;
  maxRetryAfterMs?: number;
  connectTimeoutMs?: number;
  maxInFlight?: number;
};

export type LlmConfig = {
  tiers?: TierConfig[];
  budget?: number;
  maxRetryAfterMs?: number;
  timeouts?: { connectMs?: number; firstTokenMs?: number; idleMs?: number; totalMs?: number };
  hedgeAfterMs?: number;
  /** Most requests in flight to one tier at once, per process (a tier's own setting wins). */
  maxInFlight?: number;
  sameTierRetries?: number;
  streamPlainCalls?: boolean;
  breaker?: { failureThreshold?: number; cooldownMs?: number };
  quotaCooldownMs?: number;
  /** `false` leaves the offline degraded tier out of the default chain. */
  degraded?: boolean;
};

/** The router settings of a configuration, everything but the tiers. */
export type LlmRouterSettings = Pick<
  LlmConfig,
  | 'budget'
  | 'maxRetryAfterMs'
  | 'timeouts'
  | 'hedgeAfterMs'
  | 'breaker'
  | 'quotaCooldownMs'
  | 'maxInFlight'
  | 'sameTierRetries'
  | 'streamPlainCalls'
>;

/** A router tier with what configuration adds to it, for the router and for `keel doctor`. */
export type ConfiguredTier = RouterTier & {
  price?: TierPrice;
  /** True for the offline tier: its answers are extracted, not generated. */
  degraded?: boolean;
  connectTimeoutMs?: number;
  kind: ProviderKind;
  /** The name of the variable the key came from, to say what to check when it is refused. */
  keyEnv?: string;
  /** Where the tier's requests go, without credentials or query (absent for the degraded tier). */
  baseURL?: string;
};

export type Env = Record<string, string | undefined>;

export const CONFIG_FILE = 'keel.config.json';

export const DEFAULT_MODELS = { anthropic: 'claude-sonnet-4-5', openai: 'gpt-4.1-mini' } as const;

const DEFAULT_BASE_URLS = {
  anthropic: 'https://api.anthropic.com',
  openai: 'https://api.openai.com/v1',
} as const;

/** The key variable of each hosted provider, when a tier names none. */
const KEY_ENV: Partial<Record<ProviderKind, string>> = {
  anthropic: 'ANTHROPIC_API_KEY',
  openai: 'OPENAI_API_KEY',
  gemini: PRESETS.gemini.apiKeyEnv,
  xai: PRESETS.xai.apiKeyEnv,
};

/** Providers whose tiers must name their model: there is no default worth guessing. */
const MODEL_REQUIRED: ReadonlySet<ProviderKind> = new Set([
  'ollama',
  'lmstudio',
  'gemini',
  'xai',
  'openai-compatible',
]);

/** What an OpenAI-compatible server that needs no key is sent as one (the SDK wants a string). */
const NO_KEY = 'none';

const LLM_FIELDS = [
  'tiers',
  'budget',
  'maxRetryAfterMs',
  'timeouts',
  'hedgeAfterMs',
  'breaker',
  'quotaCooldownMs',
  'degraded',
  'maxInFlight',
  'sameTierRetries',
  'streamPlainCalls',
] as const;
const TIER_FIELDS = [
  'name',
  'provider',
  'model',
  'baseURL',
  'apiKeyEnv',
  'contextWindow',
  'price',
  'maxRetryAfterMs',
  'connectTimeoutMs',
  'maxInFlight',
] as const;
const TIMEOUT_FIELDS = ['connectMs', 'firstTokenMs', 'idleMs', 'totalMs'] as const;
const BREAKER_FIELDS = ['failureThreshold', 'cooldownMs'] as const;
const PRICE_FIELDS = ['input', 'output', 'cacheRead', 'cacheWrite'] as const;

/** Field names that only ever hold a secret, compared lowercase without `_` and `-`. */
const SECRET_FIELDS: ReadonlySet<string> = new Set([
  'apikey',
  'key',
  'token',
  'authtoken',
  'accesstoken',
  'secret',
  'password',
  'authorization',
  'bearer',
]);

/** Shapes of provider keys: OpenAI and Anthropic (`sk-…`), xAI, Groq, Google, Hugging Face. */
const KEY_PATTERNS: readonly RegExp[] = [
  /\b(?:sk|xai)-[A-Za-z0-9_-]{12,}/,
  /\bgsk_[A-Za-z0-9]{20,}/,
  /\bAIza[0-9A-Za-z_-]{30,}/,
  /\bhf_[A-Za-z0-9]{30,}/,
  /^Bearer\s+\S+/i,
];

const ENV_NAME = /^[A-Za-z_][A-Za-z0-9_]*$/;

const KEY_HINT =
  'Put the key in an environment variable and name that variable with "apiKeyEnv", ' +
  'e.g. "apiKeyEnv": "ANTHROPIC_API_KEY".';

const isRecord = (value: unknown): value is Record<string, unknown> =>
  typeof value === 'object' && value !== null && !Array.isArray(value);

const list = (values: readonly string[]) => values.join(', ');

/** Validates configuration values, every error naming the file and the field. */
class Checker {
  constructor(private readonly source: string) {}

  fail(path: string, problem: string, hint: string): never {
    throw new InputError(`Invalid LLM configuration in ${this.source}: ${path} ${problem}.`, {
      hint,
    });
  }

  /** Refuses secret-named fields and key-shaped strings anywhere in `value`, before anything else. */
  noSecrets(value: unknown, path: string): void {
    if (typeof value === 'string') {
      if (KEY_PATTERNS.some((p) => p.test(value))) {
        this.fail(
          path,
          'holds what looks like an API key; keys never go in configuration',
          KEY_HINT,
        );
      }
    } else if (Array.isArray(value)) {
      value.forEach((item, i) => this.noSecrets(item, `${path}[${i}]`));
    } else if (isRecord(value)) {
      for (const [key, item] of Object.entries(value)) {
        if (SECRET_FIELDS.has(key.toLowerCase().replace(/[-_]/g, ''))) {
          this.fail(`${path}.${key}`, 'is not allowed: keys never go in configuration', KEY_HINT);
        }
        this.noSecrets(item, `${path}.${key}`);
      }
    }
  }

  object(value: unknown, path: string, fields: readonly string[], example: string) {
    if (!isRecord(value)) this.fail(path, 'must be an object', `For example: ${example}.`);
    for (const key of Object.keys(value)) {
      if (!fields.includes(key)) {
        this.fail(`${path}.${key}`, 'is not a known setting', `Known settings: ${list(fields)}.`);
      }
    }
    return value;
  }

  string(value: unknown, path: string, hint: string): string {
    if (typeof value !== 'string' || value.trim() === '') {
      this.fail(path, 'must be a non-empty string', hint);
    }
    return value;
  }

  wholeNumber(value: unknown, path: string, hint: string): number {
    if (typeof value !== 'number' || !Number.isInteger(value) || value < 1) {
      this.fail(path, `must be a whole number of at least 1, got ${JSON.stringify(value)}`, hint);
    }
    return value;
  }

  /** A number >= 0 (> 0 when `positive`). */
  amount(value: unknown, path: string, unit: string, positive = false): number {
    const ok =
      typeof value === 'number' && Number.isFinite(value) && (positive ? value > 0 : value >= 0);
    if (!ok) {
      this.fail(
        path,
        `must be a number ${positive ? '> 0' : '>= 0'} (${unit}), got ${JSON.stringify(value)}`,
        `Set it to a ${positive ? 'positive' : 'non-negative'} number, or leave it out for the default.`,
      );
    }
    return value;
  }

  url(value: unknown, path: string): string {
    const text = this.string(
      value,
      path,
      'Give the server address, e.g. "http://127.0.0.1:8000/v1".',
    );
    let url: URL;
    try {
      url = new URL(text);
    } catch {
      return this.fail(
        path,
        'is not a URL',
        'Give the full address, e.g. "http://127.0.0.1:8000/v1".',
      );
    }
    if (url.protocol !== 'http:' && url.protocol !== 'https:') {
      this.fail(path, 'must be an http:// or https:// URL', 'E.g. "http://127.0.0.1:8000/v1".');
    }
    if (url.username || url.password) {
      this.fail(path, 'carries credentials; keys never go in configuration', KEY_HINT);
    }
    return text;
  }
}

function checkPrice(c: Checker, value: unknown, path: string): TierPrice {
  const o = c.object(value, path, PRICE_FIELDS, '"price": { "input": 3, "output": 15 }');
  const unit = 'US dollars per million tokens';
  if (o.input === undefined || o.output === undefined) {
    c.fail(
      path,
      'needs both "input" and "output"',
      'Prices are US dollars per million tokens, e.g. { "input": 3, "output": 15 }.',
    );
  }
  const price: TierPrice = {
    input: c.amount(o.input, `${path}.input`, unit),
    output: c.amount(o.output, `${path}.output`, unit),
  };
  if (o.cacheRead !== undefined) price.cacheRead = c.amount(o.cacheRead, `${path}.cacheRead`, unit);
  if (o.cacheWrite !== undefined) {
    price.cacheWrite = c.amount(o.cacheWrite, `${path}.cacheWrite`, unit);
  }
  return price;
}

function checkTier(c: Checker, value: unknown, path: string): TierConfig {
  const o = c.object(value, path, TIER_FIELDS, '{ "provider": "anthropic" }');
  if (o.provider === undefined) {
    c.fail(`${path}.provider`, 'is missing', `Set it to one of: ${list(PROVIDER_KINDS)}.`);
  }
  if (
    typeof o.provider !== 'string' ||
    !(PROVIDER_KINDS as readonly string[]).includes(o.provider)
  ) {
    c.fail(
      `${path}.provider`,
      `is ${JSON.stringify(o.provider)}, which keel does not know`,
      `Use one of: ${list(PROVIDER_KINDS)}.`,
    );
  }
  const provider = o.provider as ProviderKind;
  const tier: TierConfig = { provider };
  if (o.name !== undefined)
    tier.name = c.string(o.name, `${path}.name`, 'Name the tier, e.g. "main".');
  if (provider === 'degraded') {
    for (const field of ['model', 'baseURL', 'apiKeyEnv'] as const) {
      if (o[field] !== undefined) {
        c.fail(
          `${path}.${field}`,
          'does not apply to the degraded tier',
          'The degraded tier runs offline with no model, server or key; remove the field.',
        );
      }
    }
  }
  if (o.model !== undefined) {
    tier.model = c.string(o.model, `${path}.model`, 'Name the model, e.g. "claude-sonnet-4-5".');
  } else if (MODEL_REQUIRED.has(provider)) {
    c.fail(
      `${path}.model`,
      `is required for provider ${provider}`,
      'Name the model the server serves, e.g. "model": "llama3.2".',
    );
  }
  if (o.baseURL !== undefined) tier.baseURL = c.url(o.baseURL, `${path}.baseURL`);
  else if (provider === 'openai-compatible') {
    c.fail(
      `${path}.baseURL`,
      'is required for provider openai-compatible',
      'Give the server address, e.g. "baseURL": "http://127.0.0.1:8000/v1".',
    );
  }
  if (o.apiKeyEnv !== undefined) {
    if (typeof o.apiKeyEnv !== 'string' || !ENV_NAME.test(o.apiKeyEnv)) {
      c.fail(
        `${path}.apiKeyEnv`,
        'must be the name of an environment variable (letters, digits and _), not a key',
        KEY_HINT,
      );
    }
    tier.apiKeyEnv = o.apiKeyEnv;
  }
  if (o.contextWindow !== undefined) {
    tier.contextWindow = c.wholeNumber(
      o.contextWindow,
      `${path}.contextWindow`,
      "Set it to the model's context window in tokens, e.g. 200000.",
    );
  }
  if (o.price !== undefined) tier.price = checkPrice(c, o.price, `${path}.price`);
  if (o.maxRetryAfterMs !== undefined) {
    tier.maxRetryAfterMs = c.amount(o.maxRetryAfterMs, `${path}.maxRetryAfterMs`, 'milliseconds');
  }
  if (o.maxInFlight !== undefined) {
    tier.maxInFlight = c.wholeNumber(
      o.maxInFlight,
      `${path}.maxInFlight`,
      'It is the most requests in flight to this tier at once, e.g. 8.',
    );
  }
  if (o.connectTimeoutMs !== undefined) {
    tier.connectTimeoutMs = c.amount(
      o.connectTimeoutMs,
      `${path}.connectTimeoutMs`,
      'milliseconds',
      true,
    );
  }
  return tier;
}

function checkTiers(c: Checker, value: unknown, degraded: boolean | undefined): TierConfig[] {
  if (!Array.isArray(value)) {
    c.fail(
      'llm.tiers',
      'must be a list of tiers',
      'For example: "tiers": [{ "provider": "anthropic" }].',
    );
  }
  const tiers = value.map((t, i) => checkTier(c, t, `llm.tiers[${i}]`));
  const seen = new Map<string, number>();
  tiers.forEach((tier, i) => {
    if (tier.name === undefined) return;
    const first = seen.get(tier.name);
    if (first !== undefined) {
      c.fail(
        `llm.tiers[${i}].name`,
        `"${tier.name}" is already the name of llm.tiers[${first}]`,
        'Tier names must be unique; rename one of them.',
      );
    }
    seen.set(tier.name, i);
  });
  const offline = tiers.findIndex((t) => t.provider === 'degraded');
  if (degraded === false && offline >= 0) {
    c.fail(
      `llm.tiers[${offline}]`,
      'is a degraded tier, but llm.degraded is false',
      'Remove the degraded tier or the "degraded": false setting.',
    );
  }
  return tiers;
}

/**
 * Validates the `llm` section of a configuration (`source` names where it came from, for errors)
 * and returns a clean copy. Throws an {@link InputError} naming the field and what to do.
 */
export function parseLlmConfig(value: unknown, source = 'configuration'): LlmConfig {
  // Typed explicitly so that `c.fail(...)`, which never returns, narrows what follows it.
  const c: Checker = new Checker(source);
  c.noSecrets(value, 'llm');
  const o = c.object(value, 'llm', LLM_FIELDS, '"llm": { "tiers": [{ "provider": "anthropic" }] }');
  const config: LlmConfig = {};
  if (o.degraded !== undefined) {
    if (typeof o.degraded !== 'boolean') {
      c.fail(
        'llm.degraded',
        'must be true or false',
        'false leaves the offline degraded tier out.',
      );
    }
    config.degraded = o.degraded;
  }
  if (o.tiers !== undefined) config.tiers = checkTiers(c, o.tiers, config.degraded);
  if (o.budget !== undefined) {
    config.budget = c.wholeNumber(
      o.budget,
      'llm.budget',
      'It is the most requests one call may send, over all tiers, e.g. 4.',
    );
  }
  if (o.maxRetryAfterMs !== undefined) {
    config.maxRetryAfterMs = c.amount(o.maxRetryAfterMs, 'llm.maxRetryAfterMs', 'milliseconds');
  }
  if (o.hedgeAfterMs !== undefined) {
    config.hedgeAfterMs = c.amount(o.hedgeAfterMs, 'llm.hedgeAfterMs', 'milliseconds', true);
  }
  if (o.quotaCooldownMs !== undefined) {
    config.quotaCooldownMs = c.amount(o.quotaCooldownMs, 'llm.quotaCooldownMs', 'milliseconds');
  }
  if (o.maxInFlight !== undefined) {
    config.maxInFlight = c.wholeNumber(
      o.maxInFlight,
      'llm.maxInFlight',
      'It is the most requests in flight to one tier at once, e.g. 8.',
    );
  }
  if (o.sameTierRetries !== undefined) {
    config.sameTierRetries = c.wholeNumber(
      o.sameTierRetries,
      'llm.sameTierRetries',
      'It is how many times a call retries a busy tier before moving on, e.g. 2.',
    );
  }
  if (o.streamPlainCalls !== undefined) {
    if (typeof o.streamPlainCalls !== 'boolean') {
      throw new InputError('llm.streamPlainCalls must be true or false.', {
        hint: 'Leave it out to stream plain calls where the provider can.',
      });
    }
    config.streamPlainCalls = o.streamPlainCalls;
  }
  if (o.timeouts !== undefined) {
    const t = c.object(
      o.timeouts,
      'llm.timeouts',
      TIMEOUT_FIELDS,
      '"timeouts": { "totalMs": 60000 }',
    );
    config.timeouts = {};
    for (const field of TIMEOUT_FIELDS) {
      if (t[field] !== undefined) {
        config.timeouts[field] = c.amount(t[field], `llm.timeouts.${field}`, 'milliseconds', true);
      }
    }
  }
  if (o.breaker !== undefined) {
    const b = c.object(
      o.breaker,
      'llm.breaker',
      BREAKER_FIELDS,
      '"breaker": { "failureThreshold": 3 }',
    );
    config.breaker = {};
    if (b.failureThreshold !== undefined) {
      config.breaker.failureThreshold = c.wholeNumber(
        b.failureThreshold,
        'llm.breaker.failureThreshold',
        'It is how many failures in a row open the breaker, e.g. 3.',
      );
    }
    if (b.cooldownMs !== undefined) {
      config.breaker.cooldownMs = c.amount(b.cooldownMs, 'llm.breaker.cooldownMs', 'milliseconds');
    }
  }
  return config;
}

/** 1-based line and column of a character offset. */
function lineAndColumn(text: string, offset: number): { line: number; column: number } {
  const before = text.slice(0, offset).split('\n');
  return { line: before.length, column: (before.at(-1)?.length ?? 0) + 1 };
}

/** Unwinds {@link jsonSyntaxError}'s scan at the first error. */
class JsonSyntaxStop extends Error {
  constructor(
    readonly offset: number,
    readonly expected: string,
  ) {
    super(`expected ${expected} at ${offset}`);
  }
}

/**
 * Where the JSON in `text` first goes wrong, and what was expected there. Node's own message quotes
 * the text around the error, which may be a key pasted into the file, so the position is found
 * here and the text is never quoted.
 */
export function jsonSyntaxError(text: string): { offset: number; expected: string } | undefined {
  let i = 0;
  const stop = (expected: string): never => {
    throw new JsonSyntaxStop(i, expected);
  };
  const space = () => {
    while (i < text.length && ' \t\n\r'.includes(text[i]!)) i += 1;
  };
  const string = () => {
    i += 1;
    while (i < text.length) {
      const ch = text[i]!;
      if (ch === '"') {
        i += 1;
        return;
      }
      if (ch === '\\') {
        const esc = text[i + 1] ?? '';
        if ('"\\/bfnrt'.includes(esc) && esc !== '') i += 2;
        else if (esc === 'u' && /^[0-9a-fA-F]{4}$/.test(text.slice(i + 2, i + 6))) i += 6;
        else stop('a valid escape sequence');
        continue;
      }
      if (ch < ' ') stop('the closing quote of the string');
      i += 1;
    }
    stop('the closing quote of the string');
  };
  const value = (): void => {
    space();
    const ch = text[i];
    if (ch === '{' || ch === '[') {
      const close = ch === '{' ? '}' : ']';
      i += 1;
      space();
      if (text[i] === close) {
        i += 1;
        return;
      }
      for (;;) {
        if (close === '}') {
          space();
          if (text[i] !== '"') stop('a property name in double quotes');
          string();
          space();
          if (text[i] !== ':') stop("':'");
          i += 1;
        }
        value();
        space();
        if (text[i] === ',') {
          i += 1;
          continue;
        }
        if (text[i] === close) {
          i += 1;
          return;
        }
        stop(`',' or '${close}'`);
      }
    }
    if (ch === '"') return string();
    const number = /-?(?:0|[1-9]\d*)(?:\.\d+)?(?:[eE][+-]?\d+)?/y;
    number.lastIndex = i;
    if (number.test(text)) {
      i = number.lastIndex;
      return;
    }
    for (const literal of ['true', 'false', 'null']) {
      if (text.startsWith(literal, i)) {
        i += literal.length;
        return;
      }
    }
    stop('a value');
  };
  try {
    value();
    space();
    if (i < text.length) stop('the end of the file');
    return undefined;
  } catch (err) {
    if (err instanceof JsonSyntaxStop) return { offset: err.offset, expected: err.expected };
    throw err;
  }
}

export type LoadLlmConfigOptions = {
  cwd: string;
  /** A configuration file to read instead of `KEEL_CONFIG` or `keel.config.json` in `cwd`. */
  file?: string;
  env?: Env;
};

/**
 * The `llm` section of the configuration file, validated: `file`, else `KEEL_CONFIG`, else
 * `keel.config.json` in `cwd` (relative paths from `cwd`). Undefined when the default file does
 * not exist or has no `llm` key; a file named explicitly must exist.
 */
export function loadLlmConfig(options: LoadLlmConfigOptions): LlmConfig | undefined {
  const env = options.env ?? process.env;
  const named = options.file ?? (env.KEEL_CONFIG || undefined);
  const path = resolve(options.cwd, named ?? CONFIG_FILE);
  if (!existsSync(path)) {
    if (named === undefined) return undefined;
    throw new InputError(`Configuration file ${path} does not exist.`, {
      hint:
        options.file !== undefined
          ? 'Check the path given to --config.'
          : `Check KEEL_CONFIG, or unset it to use ${CONFIG_FILE} in the current folder.`,
    });
  }
  let text: string;
  try {
    text = readFileSync(path, 'utf8').replace(/^\uFEFF/, '');
  } catch (err) {
    throw new InputError(`Configuration file ${path} cannot be read.`, {
      hint: `It must be a readable JSON file (${(err as NodeJS.ErrnoException).code ?? 'error'}).`,
    });
  }
  let root: unknown;
  try {
    root = JSON.parse(text);
  } catch {
    const error = jsonSyntaxError(text);
    const where = error ? lineAndColumn(text, error.offset) : undefined;
    throw new InputError(
      error && where
        ? `${path} is not valid JSON: expected ${error.expected} at line ${where.line}, column ${where.column}.`
        : `${path} is not valid JSON.`,
      { hint: 'Fix the file: JSON has no comments and no trailing commas.' },
    );
  }
  if (!isRecord(root)) {
    throw new InputError(`${path} must hold a JSON object.`, {
      hint: 'For example: { "llm": { "tiers": [{ "provider": "anthropic" }] } }.',
    });
  }
  if (root.llm === undefined) return undefined;
  return parseLlmConfig(root.llm, path);
}

/** The router settings of a configuration (no tiers), as a plain object with only what is set. */
export function routerOptionsFrom(config: LlmConfig | undefined): LlmRouterSettings {
  const out: LlmRouterSettings = {};
  if (!config) return out;
  if (config.budget !== undefined) out.budget = config.budget;
  if (config.maxRetryAfterMs !== undefined) out.maxRetryAfterMs = config.maxRetryAfterMs;
  if (config.breaker !== undefined) out.breaker = { ...config.breaker };
  if (config.quotaCooldownMs !== undefined) out.quotaCooldownMs = config.quotaCooldownMs;
  if (config.timeouts !== undefined) out.timeouts = { ...config.timeouts };
  if (config.hedgeAfterMs !== undefined) out.hedgeAfterMs = config.hedgeAfterMs;
  if (config.maxInFlight !== undefined) out.maxInFlight = config.maxInFlight;
  if (config.sameTierRetries !== undefined) out.sameTierRetries = config.sameTierRetries;
  if (config.streamPlainCalls !== undefined) out.streamPlainCalls = config.streamPlainCalls;
  return out;
}

export type BuildTiersOptions = {
  env?: Env;
  /** Whether the default chain looks for a local server (GET {base}/models). */
  probe?: boolean;
  probeTimeoutMs?: number;
  /** A whole-request timeout given to every provider built. */
  timeoutMs?: number;
};

export type BuiltTiers = { tiers: ConfiguredTier[]; notes: string[] };

/** A URL as shown in notes: origin and path, no credentials, query or fragment. */
function shown(baseURL: string): string {
  const url = new URL(baseURL);
  return `${url.origin}${url.pathname === '/' ? '' : url.pathname}`;
}

/**
 * A base URL from an environment variable (validated), or `fallback` when it is unset; `example`
 * (the fallback by default) is what the error suggests.
 */
function baseFromEnv(env: Env, variable: string, fallback: string, example = fallback): string {
  const value = env[variable]?.trim();
  if (!value) return fallback;
  let url: URL | undefined;
  try {
    url = new URL(value);
  } catch {
    url = undefined;
  }
  const web = url?.protocol === 'http:' || url?.protocol === 'https:';
  if (!url || !web || url.username || url.password) {
    throw new InputError(`${variable} is not an http(s) URL without credentials.`, {
      hint: `Set it to the API's address, e.g. ${example}, or unset it.`,
    });
  }
  return value;
}

/** Whether the degraded tier may be used: `KEEL_DEGRADED` (on/off) wins over the configuration. */
export function degradedAllowed(
  config: LlmConfig | undefined,
  env: Env,
): { on: boolean; why: string } {
  const raw = env.KEEL_DEGRADED?.trim().toLowerCase();
  if (raw) {
    if (['off', 'false', '0', 'no'].includes(raw))
      return { on: false, why: 'KEEL_DEGRADED is off' };
    if (!['on', 'true', '1', 'yes'].includes(raw)) {
      throw new InputError('KEEL_DEGRADED must be on or off.', {
        hint: 'Set KEEL_DEGRADED=off to leave the offline degraded tier out, or unset it.',
      });
    }
    return { on: true, why: 'KEEL_DEGRADED is on' };
  }
  if (config?.degraded === false) return { on: false, why: 'llm.degraded is false' };
  return { on: true, why: '' };
}

/** Names for tiers: a tier's own name, else its provider's, made unique with -2, -3, … */
function tierNames(tiers: readonly TierConfig[]): string[] {
  const used = new Set(tiers.flatMap((t) => (t.name === undefined ? [] : [t.name])));
  return tiers.map((t) => {
    if (t.name !== undefined) return t.name;
    let name: string = t.provider;
    for (let n = 2; used.has(name); n++) name = `${t.provider}-${n}`;
    used.add(name);
    return name;
  });
}

function degradedTier(name: string, extra: Partial<ConfiguredTier> = {}): ConfiguredTier {
  return {
    name,
    provider: degradedProvider(),
    kind: 'degraded',
    degraded: true,
    // It reads whatever it is given, so a request too long for every model still fits here.
    contextWindow: Number.MAX_SAFE_INTEGER,
    price: { input: 0, output: 0 },
    ...extra,
  };
}

type Connection = { kind: Exclude<ProviderKind, 'degraded'>; model: string; baseURL: string };

type ConnectExtras = { connectTimeoutMs?: number | undefined; contextWindow?: number | undefined };

function connect(
  c: Connection,
  apiKey: string,
  timeoutMs: number | undefined,
  extras: ConnectExtras = {},
): LlmProvider {
  const timeout = {
    ...(timeoutMs === undefined ? {} : { timeoutMs }),
    ...(extras.connectTimeoutMs === undefined ? {} : { connectTimeoutMs: extras.connectTimeoutMs }),
  };
  if (c.kind === 'anthropic') {
    return anthropicProvider({ apiKey, baseURL: c.baseURL, model: c.model, ...timeout });
  }
  return openaiProvider({
    apiKey,
    baseURL: c.baseURL,
    model: c.model,
    name: c.kind,
    ...timeout,
    // Ollama's OpenAI endpoint cuts a long prompt to its window without a word: check every answer.
    ...(c.kind === 'ollama'
      ? {
          detectTruncation:
            extras.contextWindow === undefined ? {} : { contextWindow: extras.contextWindow },
        }
      : {}),
  });
}

/** The key of a configured tier, or the variable to set when it is missing. */
function keyOf(tier: TierConfig, env: Env): { key: string; keyEnv?: string } | { missing: string } {
  const variable = tier.apiKeyEnv ?? KEY_ENV[tier.provider];
  if (variable === undefined) {
    if (tier.provider === 'ollama' || tier.provider === 'lmstudio') {
      return { key: PRESETS[tier.provider].apiKey };
    }
    return { key: NO_KEY };
  }
  const key = env[variable]?.trim();
  return key ? { key, keyEnv: variable } : { missing: variable };
}

function defaultBaseURL(tier: TierConfig, env: Env): string {
  switch (tier.provider) {
    case 'anthropic':
      return baseFromEnv(env, 'ANTHROPIC_BASE_URL', DEFAULT_BASE_URLS.anthropic);
    case 'openai':
      return baseFromEnv(env, 'OPENAI_BASE_URL', DEFAULT_BASE_URLS.openai);
    case 'ollama':
    case 'lmstudio':
    case 'gemini':
    case 'xai':
      return PRESETS[tier.provider].baseURL;
    default:
      // Validation makes openai-compatible name its baseURL; degraded has none.
      return '';
  }
}

function configuredModel(tier: TierConfig, env: Env): string {
  if (tier.model !== undefined) return tier.model;
  if (tier.provider === 'anthropic')
    return env.KEEL_ANTHROPIC_MODEL?.trim() || DEFAULT_MODELS.anthropic;
  return env.KEEL_OPENAI_MODEL?.trim() || DEFAULT_MODELS.openai;
}

function tierExtras(tier: TierConfig): Partial<ConfiguredTier> {
  const extra: Partial<ConfiguredTier> = {};
  if (tier.contextWindow !== undefined) extra.contextWindow = tier.contextWindow;
  if (tier.price !== undefined) extra.price = { ...tier.price };
  if (tier.maxRetryAfterMs !== undefined) extra.maxRetryAfterMs = tier.maxRetryAfterMs;
  if (tier.connectTimeoutMs !== undefined) extra.connectTimeoutMs = tier.connectTimeoutMs;
  if (tier.maxInFlight !== undefined) extra.maxInFlight = tier.maxInFlight;
  return extra;
}

function configuredTiers(
  config: LlmConfig,
  tiersConfig: readonly TierConfig[],
  env: Env,
  timeoutMs: number | undefined,
): BuiltTiers {
  const names = tierNames(tiersConfig);
  const allowed = degradedAllowed(config, env);
  const count = tiersConfig.length;
  const built: BuiltTiers = {
    tiers: [],
    notes: [`${count} configured tier${count === 1 ? '' : 's'}`],
  };
  tiersConfig.forEach((tier, i) => {
    const name = names[i]!;
    if (tier.provider === 'degraded') {
      if (!allowed.on) built.notes.push(`${name}: skipped, ${allowed.why}`);
      else {
        built.tiers.push(degradedTier(name, tierExtras(tier)));
        built.notes.push(`${name}: the offline degraded tier (extracts sentences, no model)`);
      }
      return;
    }
    const key = keyOf(tier, env);
    if ('missing' in key) {
      built.notes.push(`${name}: skipped, ${key.missing} is not set; set it to use this tier`);
      return;
    }
    const connection: Connection = {
      kind: tier.provider,
      model: configuredModel(tier, env),
      baseURL: tier.baseURL ?? defaultBaseURL(tier, env),
    };
    built.tiers.push({
      name,
      provider: connect(connection, key.key, timeoutMs, {
        connectTimeoutMs: tier.connectTimeoutMs ?? config.timeouts?.connectMs,
        contextWindow: tier.contextWindow,
      }),
      kind: tier.provider,
      baseURL: shown(connection.baseURL),
      ...(key.keyEnv === undefined ? {} : { keyEnv: key.keyEnv }),
      ...tierExtras(tier),
    });
    const from = key.keyEnv === undefined ? 'no key needed' : `key from ${key.keyEnv}`;
    built.notes.push(
      `${name}: ${tier.provider} ${connection.model} at ${shown(connection.baseURL)} (${from})`,
    );
  });
  return built;
}

type ProbeResult = { ok: true; models: string[] } | { ok: false; why: string };

/** Asks an OpenAI-compatible server which models it serves (`GET {base}/models`). */
async function probeModels(
  baseURL: string,
  timeoutMs: number,
  apiKey: string | undefined,
): Promise<ProbeResult> {
  const url = `${baseURL.replace(/\/+$/, '')}/models`;
  const signal = AbortSignal.timeout(timeoutMs);
  let response: Response;
  try {
    response = await fetch(url, {
      signal,
      headers: apiKey ? { authorization: `Bearer ${apiKey}` } : {},
    });
  } catch {
    return { ok: false, why: `no answer within ${timeoutMs} ms` };
  }
  if (!response.ok) {
    await response.body?.cancel().catch(() => undefined);
    return { ok: false, why: `answered ${response.status}` };
  }
  let body: unknown;
  try {
    body = await response.json();
  } catch {
    return { ok: false, why: 'answered, but with no JSON model list' };
  }
  const data = isRecord(body) && Array.isArray(body.data) ? body.data : [];
  const models = data.flatMap((m) => (isRecord(m) && typeof m.id === 'string' ? [m.id] : []));
  return { ok: true, models };
}

type LocalCandidate = { kind: 'ollama' | 'lmstudio' | 'local'; baseURL: string; apiKey: string };

/**
 * The first local server that answers the probe: `KEEL_LOCAL_BASE_URL` alone when set, else
 * Ollama's and LM Studio's usual addresses (probed together, Ollama preferred).
 */
async function localTier(
  env: Env,
  timeoutMs: number,
  providerTimeoutMs: number | undefined,
  notes: string[],
): Promise<ConfiguredTier | undefined> {
  const base = baseFromEnv(env, 'KEEL_LOCAL_BASE_URL', '', PRESETS.ollama.baseURL);
  const localKey = env.KEEL_LOCAL_API_KEY?.trim() || undefined;
  const candidates: LocalCandidate[] = base
    ? [{ kind: 'local', baseURL: base, apiKey: localKey ?? NO_KEY }]
    : [
        { kind: 'ollama', ...PRESETS.ollama },
        { kind: 'lmstudio', ...PRESETS.lmstudio },
      ];
  const results = await Promise.all(
    candidates.map((c) => probeModels(c.baseURL, timeoutMs, base ? localKey : undefined)),
  );
  const index = results.findIndex((r) => r.ok);
  if (index < 0) {
    const tried = candidates.map((c, i) => {
      const r = results[i]!;
      return `${shown(c.baseURL)} ${r.ok ? 'answered' : r.why}`;
    });
    notes.push(`local: none found (GET /models: ${tried.join('; ')})`);
    return undefined;
  }
  const chosen = candidates[index]!;
  const result = results[index] as { ok: true; models: string[] };
  const named = env.KEEL_LOCAL_MODEL?.trim();
  const model = named || result.models[0];
  if (!model) {
    notes.push(
      `local: ${shown(chosen.baseURL)} answers but lists no model; load one or set KEEL_LOCAL_MODEL`,
    );
    return undefined;
  }
  const why = named
    ? 'from KEEL_LOCAL_MODEL'
    : 'the first it lists; KEEL_LOCAL_MODEL picks another';
  notes.push(`${chosen.kind}: ${shown(chosen.baseURL)} answers; model ${model} (${why})`);
  const kind = chosen.kind === 'local' ? 'openai-compatible' : chosen.kind;
  const provider = openaiProvider({
    apiKey: chosen.apiKey,
    baseURL: chosen.baseURL,
    model,
    name: chosen.kind,
    ...(providerTimeoutMs === undefined ? {} : { timeoutMs: providerTimeoutMs }),
    ...(chosen.kind === 'ollama' ? { detectTruncation: {} } : {}),
  });
  return { name: chosen.kind, provider, kind, baseURL: shown(chosen.baseURL) };
}

/** One hosted provider of the default chain, when its key variable is set. */
function hostedTier(
  kind: 'anthropic' | 'openai',
  env: Env,
  timeoutMs: number | undefined,
  notes: string[],
): ConfiguredTier | undefined {
  const keyEnv = kind === 'anthropic' ? 'ANTHROPIC_API_KEY' : 'OPENAI_API_KEY';
  const modelEnv = kind === 'anthropic' ? 'KEEL_ANTHROPIC_MODEL' : 'KEEL_OPENAI_MODEL';
  const baseEnv = kind === 'anthropic' ? 'ANTHROPIC_BASE_URL' : 'OPENAI_BASE_URL';
  const key = env[keyEnv]?.trim();
  if (!key) {
    notes.push(`${kind}: skipped, ${keyEnv} is not set`);
    return undefined;
  }
  const named = env[modelEnv]?.trim();
  const model = named || DEFAULT_MODELS[kind];
  const baseURL = baseFromEnv(env, baseEnv, DEFAULT_BASE_URLS[kind]);
  const why = named ? `from ${modelEnv}` : `default; ${modelEnv} picks another`;
  notes.push(`${kind}: ${keyEnv} is set; model ${model} (${why}) at ${shown(baseURL)}`);
  return {
    name: kind,
    provider: connect({ kind, model, baseURL }, key, timeoutMs),
    kind,
    keyEnv,
    baseURL: shown(baseURL),
  };
}

async function defaultChain(
  config: LlmConfig | undefined,
  env: Env,
  options: BuildTiersOptions,
): Promise<BuiltTiers> {
  // Read first, so that a bad KEEL_DEGRADED fails before anything is probed.
  const allowed = degradedAllowed(config, env);
  const notes = ['no tiers configured: using the default chain'];
  const tiers: ConfiguredTier[] = [];
  for (const kind of ['anthropic', 'openai'] as const) {
    const tier = hostedTier(kind, env, options.timeoutMs, notes);
    if (tier) tiers.push(tier);
  }
  if (options.probe === false) notes.push('local: not probed');
  else {
    const local = await localTier(env, options.probeTimeoutMs ?? 300, options.timeoutMs, notes);
    if (local) tiers.push(local);
  }
  if (allowed.on) {
    tiers.push(degradedTier('degraded'));
    notes.push('degraded: the offline extractive tier comes last (KEEL_DEGRADED=off removes it)');
  } else {
    notes.push(`degraded: off, ${allowed.why}`);
  }
  return { tiers, notes };
}

/**
 * The router tiers of a configuration: its `tiers` in order (a tier whose key variable is unset is
 * skipped with a note), or the default chain when it has none. Notes say what was chosen and why,
 * naming variables, never their values.
 */
export async function buildTiers(
  config: LlmConfig | undefined,
  options: BuildTiersOptions = {},
): Promise<BuiltTiers> {
  const env = options.env ?? process.env;
  const checked = config === undefined ? undefined : parseLlmConfig(config);
  if (checked?.tiers?.length)
    return configuredTiers(checked, checked.tiers, env, options.timeoutMs);
  return defaultChain(checked, env, options);
}
