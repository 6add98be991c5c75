import { defineConfig } from 'drizzle-kit';

export default defineConfig({
  dialect: 'sqlite',
  schema: './adapters/sqlite/schema.ts',
  out: './migrations',
});
