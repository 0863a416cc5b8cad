-- Round 2: the OpenAI front door (SPEC.md §10).
--
-- origin: how the task came in. 'queue' is POST /queue/submit (and submit_batch): its
-- client polls or waits for the stored result, so an unfinished task is driven again after
-- a restart. 'openai' is POST /v1/chat/completions or /v1/completions: its client holds
-- the HTTP connection for the answer, so after a restart nobody is left to answer and the
-- task is completed as failed ("scheduler restarted") instead of being sent again.
ALTER TABLE tasks ADD COLUMN origin TEXT NOT NULL DEFAULT 'queue'
    CHECK (origin IN ('queue', 'openai'));

-- ttft_ms: for a streamed front-door request, the time from its arrival to the first
-- chunk that carried text (what the client saw as time to first token); NULL otherwise.
ALTER TABLE tasks ADD COLUMN ttft_ms REAL;
