CREATE TABLE `checkpoints` (
	`run_id` text NOT NULL,
	`seq` integer NOT NULL,
	`kind` text NOT NULL,
	`step` text,
	`data` text NOT NULL,
	`created_at` integer NOT NULL,
	PRIMARY KEY(`run_id`, `seq`),
	FOREIGN KEY (`run_id`) REFERENCES `runs`(`id`) ON UPDATE no action ON DELETE no action
) WITHOUT ROWID;
--> statement-breakpoint
CREATE TABLE `effects` (
	`run_id` text NOT NULL,
	`key` text NOT NULL,
	`name` text NOT NULL,
	`step` text NOT NULL,
	`status` text NOT NULL,
	`result` text,
	`error` text,
	`attempts` integer DEFAULT 0 NOT NULL,
	`started_at` integer NOT NULL,
	`completed_at` integer,
	`completion_order` integer,
	`compensation_attempts` integer DEFAULT 0 NOT NULL,
	`compensated_at` integer,
	`compensable` integer DEFAULT false NOT NULL,
	PRIMARY KEY(`run_id`, `key`),
	FOREIGN KEY (`run_id`) REFERENCES `runs`(`id`) ON UPDATE no action ON DELETE no action
) WITHOUT ROWID;
--> statement-breakpoint
CREATE TABLE `run_specs` (
	`run_id` text PRIMARY KEY NOT NULL,
	`graph` text NOT NULL,
	`input` text NOT NULL,
	`options` text DEFAULT '{}' NOT NULL,
	FOREIGN KEY (`run_id`) REFERENCES `runs`(`id`) ON UPDATE no action ON DELETE no action
);
--> statement-breakpoint
CREATE TABLE `runs` (
	`id` text PRIMARY KEY NOT NULL,
	`workflow` text NOT NULL,
	`version` integer NOT NULL,
	`fingerprint` text NOT NULL,
	`module` text,
	`status` text NOT NULL,
	`cursor` text,
	`cursor_attempts` integer DEFAULT 0 NOT NULL,
	`step_count` integer DEFAULT 0 NOT NULL,
	`seq` integer NOT NULL,
	`snapshot_seq` integer NOT NULL,
	`snapshot_bytes` integer NOT NULL,
	`patch_bytes` integer DEFAULT 0 NOT NULL,
	`patch_count` integer DEFAULT 0 NOT NULL,
	`error` text,
	`epoch` integer DEFAULT 1 NOT NULL,
	`lease_owner` text,
	`lease_pid` integer,
	`lease_host` text,
	`lease_expires_at` integer,
	`created_at` integer NOT NULL,
	`updated_at` integer NOT NULL,
	`ended_at` integer
);
--> statement-breakpoint
CREATE INDEX `runs_status_idx` ON `runs` (`status`);--> statement-breakpoint
CREATE INDEX `runs_workflow_idx` ON `runs` (`workflow`,`created_at`);--> statement-breakpoint
CREATE TABLE `steps` (
	`run_id` text NOT NULL,
	`idx` integer NOT NULL,
	`epoch` integer NOT NULL,
	`name` text NOT NULL,
	`status` text NOT NULL,
	`attempts` integer NOT NULL,
	`next` text,
	`started_at` integer NOT NULL,
	`ended_at` integer NOT NULL,
	`error` text,
	PRIMARY KEY(`run_id`, `idx`, `epoch`),
	FOREIGN KEY (`run_id`) REFERENCES `runs`(`id`) ON UPDATE no action ON DELETE no action
) WITHOUT ROWID;
