/**
 * A failed call to a provider, as every adapter reports it: what the wire said (`failure`), with no
 * SDK types and never an API key, for the engine's classifier to turn into a decision.
 */
import type { ProviderFailure } from '../../engine/llm/types.ts';

export class ProviderError extends Error {
  override name = 'ProviderError';
  readonly provider: string;
  readonly failure: ProviderFailure;

  constructor(provider: string, failure: ProviderFailure) {
    super(`${provider}: ${failure.message}`);
    this.provider = provider;
    this.failure = failure;
  }
}
