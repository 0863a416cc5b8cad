-- Round 2: OpenAI-compatible Task Instances (SPEC.md §9).
--
-- kind: how the scheduler talks to the TI. 'callback' is our own protocol (the TI accepts
-- a task and calls back); 'openai' is an OpenAI-compatible server that answers each
-- request with its response, so the scheduler keeps the TI's queue itself (its unfinished
-- tasks, in submit order) and sends a task whenever one of max_concurrency slots is free.
-- max_concurrency: requests in flight to the TI at once (1..=1024); for a callback TI it
-- bounds the dispatches in flight and tells the queue estimate how many run at once.
ALTER TABLE task_instances ADD COLUMN kind TEXT NOT NULL DEFAULT 'callback'
    CHECK (kind IN ('callback', 'openai'));
ALTER TABLE task_instances ADD COLUMN max_concurrency INTEGER
    CHECK (max_concurrency IS NULL OR max_concurrency BETWEEN 1 AND 1024);

-- Token usage that an OpenAI-compatible TI reported in its response (`usage`), for SQL
-- and for the README's analysis; NULL when the TI did not say (and for callback TIs).
ALTER TABLE tasks ADD COLUMN prompt_tokens INTEGER;
ALTER TABLE tasks ADD COLUMN completion_tokens INTEGER;
