-- The queue as a WITHOUT ROWID table: a row lives in one b-tree keyed by run_id instead of a rowid
-- table plus its primary-key index, so claiming and finishing a run write one page fewer. Its two
-- indexes are partial: rows with no due time (a run being worked on, a wait with no timeout) are in
-- neither, and change without touching them. queue_ready_idx serves the worker in claim order.
CREATE TABLE `__new_queue` (
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
) WITHOUT ROWID;
--> statement-breakpoint
INSERT INTO `__new_queue` (`run_id`, `workflow`, `due_at`, `priority`, `parks`, `waiting_since`, `reason`, `last_error`, `history`, `created_at`) SELECT `run_id`, `workflow`, `due_at`, `priority`, `parks`, `waiting_since`, `reason`, `last_error`, `history`, `created_at` FROM `queue`;
--> statement-breakpoint
DROP TABLE `queue`;
--> statement-breakpoint
ALTER TABLE `__new_queue` RENAME TO `queue`;
--> statement-breakpoint
CREATE INDEX `queue_due_idx` ON `queue` (`due_at`,`priority`) WHERE due_at IS NOT NULL;
--> statement-breakpoint
CREATE INDEX `queue_ready_idx` ON `queue` ("priority" DESC,`due_at`,`created_at`) WHERE due_at IS NOT NULL;
