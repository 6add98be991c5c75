import { defineConfig } from 'vitest/config';

export default defineConfig({
  test: {
    include: ['tests/**/*.test.ts'],
    testTimeout: 60_000,
    hookTimeout: 60_000,
    pool: 'forks',
    reporters: ['default', 'json'],
    outputFile: { json: '.ci/out/vitest.json' },
    typecheck: { enabled: true, include: ['tests/**/*.test-d.ts'] },
  },
});
