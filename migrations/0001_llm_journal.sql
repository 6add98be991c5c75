CREATE TABLE `llm_calls` (
	`run_id` text NOT NULL,
	`step_index` integer NOT NULL,
	`position` integer NOT NULL,
	`step` text NOT NULL,
	`request_hash` text NOT NULL,
	`status` text NOT NULL,
	`streamed` integer DEFAULT false NOT NULL,
	`response` text,
	`error` text,
	`tier` text,
	`provider` text,
	`model` text,
	`degraded` integer DEFAULT false NOT NULL,
	`attempts` text NOT NULL,
	`input_tokens` integer DEFAULT 0 NOT NULL,
	`output_tokens` integer DEFAULT 0 NOT NULL,
	`cache_read_tokens` integer DEFAULT 0 NOT NULL,
	`cache_write_tokens` integer DEFAULT 0 NOT NULL,
	`cost_usd` real,
	`latency_ms` integer DEFAULT 0 NOT NULL,
	`replays` integer DEFAULT 0 NOT NULL,
	`created_at` integer NOT NULL,
	`updated_at` integer NOT NULL,
	PRIMARY KEY(`run_id`, `step_index`, `position`),
	FOREIGN KEY (`run_id`) REFERENCES `runs`(`id`) ON UPDATE no action ON DELETE no action
) WITHOUT ROWID;
--> statement-breakpoint
CREATE TABLE `llm_tiers` (
	`tier` text PRIMARY KEY NOT NULL,
	`breaker` text NOT NULL,
	`failures` integer NOT NULL,
	`open_until` integer NOT NULL,
	`probe_owner` text,
	`probe_until` integer NOT NULL,
	`down_until` integer NOT NULL,
	`misconfigured` text,
	`updated_at` integer NOT NULL
) WITHOUT ROWID;
