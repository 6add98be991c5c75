#!/usr/bin/env node
// The `keel` command. TypeScript workflow files (and keel itself) load through tsx, so a workflow in
// the user's project runs with no build step of its own.
import { register as registerHooks } from 'node:module';
import { register as registerTsx } from 'tsx/esm/api';

registerTsx();
registerHooks('./resolve-keel.js', import.meta.url, {
  data: { entry: new URL('../index.ts', import.meta.url).href },
});
await import('./main.ts');
