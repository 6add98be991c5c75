CREATE TABLE `dead_letters` (
	`run_id` text PRIMARY KEY NOT NULL,
	`workflow` text NOT NULL,
	`step` text,
	`reason` text NOT NULL,
	`error` text NOT NULL,
	`history` text NOT NULL,
	`created_at` integer NOT NULL,
	`dropped_at` integer,
	FOREIGN KEY (`run_id`) REFERENCES `runs`(`id`) ON UPDATE no action ON DELETE no action
);
--> statement-breakpoint
CREATE TABLE `queue` (
	`run_id` text PRIMARY KEY NOT NULL,
	`workflow` text NOT NULL,
	`due_at` integer,
	`priority` integer DEFAULT 0 NOT NULL,
	`parks` integer DEFAULT 0 NOT NULL,
	`waiting_since` integer,
	`reason` text NOT NULL,
	`last_error` text,
	`history` text DEFAULT '[]' NOT NULL,
	`created_at` integer NOT NULL,
	FOREIGN KEY (`run_id`) REFERENCES `runs`(`id`) ON UPDATE no action ON DELETE no action
);
--> statement-breakpoint
CREATE INDEX `queue_due_idx` ON `queue` (`due_at`,`priority`);--> statement-breakpoint
CREATE TABLE `signals` (
	`id` integer PRIMARY KEY AUTOINCREMENT NOT NULL,
	`run_id` text NOT NULL,
	`name` text NOT NULL,
	`payload` text,
	`sent_at` integer NOT NULL,
	`consumed_at` integer,
	FOREIGN KEY (`run_id`) REFERENCES `runs`(`id`) ON UPDATE no action ON DELETE no action
);
--> statement-breakpoint
CREATE INDEX `signals_run_idx` ON `signals` (`run_id`,`name`,`id`);--> statement-breakpoint
CREATE TABLE `waits` (
	`run_id` text NOT NULL,
	`name` text NOT NULL,
	`kind` text NOT NULL,
	`step` text NOT NULL,
	`status` text NOT NULL,
	`due_at` integer,
	`payload` text,
	`created_at` integer NOT NULL,
	`fired_at` integer,
	PRIMARY KEY(`run_id`, `name`),
	FOREIGN KEY (`run_id`) REFERENCES `runs`(`id`) ON UPDATE no action ON DELETE no action
) WITHOUT ROWID;
--> statement-breakpoint
ALTER TABLE `run_specs` ADD `queue_key` text;--> statement-breakpoint
CREATE UNIQUE INDEX `run_specs_queue_key_unique` ON `run_specs` (`queue_key`);--> statement-breakpoint
ALTER TABLE `runs` ADD `cancel_requested` integer DEFAULT 0 NOT NULL;