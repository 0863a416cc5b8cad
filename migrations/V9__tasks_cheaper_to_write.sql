-- The same tasks table, with two constraints written so that the writer's statements on
-- it cost less (the writer thread is the scheduler's narrow stage; README, Performance):
--
-- 1. status's CHECK is three comparisons instead of `status IN ('queued', 'scheduled',
--    'completed')`: SQLite evaluates a constant IN list of more than two values through a
--    temporary b-tree built at every execution, and every statement that sets status
--    (submit, dispatch, re-route, completion) ran that check.
-- 2. result_ti (V5) no longer REFERENCES task_instances. A foreign key on a column that
--    an UPDATE sets makes SQLite check it after the row is changed, so the completion ran
--    with a statement journal (a copy of every page it touched, kept in case the check
--    failed). result_ti is only ever set by the scheduler, to a TI it holds in its cache
--    (a TI row is never deleted); ti_uuid keeps its foreign key, which every submit
--    checks. PostgreSQL's schema keeps both (it has neither cost).
--
-- Nothing else changes: the same columns in the same order, the same defaults, the same
-- indexes. SQLite cannot alter a constraint in place, so the table is rebuilt (SQLite's
-- documented procedure: new table, copy, drop, rename, indexes); ti-scheduler runs its
-- migrations with foreign_keys off and runs PRAGMA foreign_key_check after them, so
-- dropping the old table does not cascade into decisions. A file of a million tasks
-- (1.3 GB) migrated in 12 s on the README's VM, and grew to 1.9 GB: the old table's
-- pages are free in the file, and new rows reuse them.
CREATE TABLE tasks_v9 (
    task_id            TEXT PRIMARY KEY NOT NULL,
    model_name         TEXT NOT NULL,
    task_input         TEXT NOT NULL,            -- JSON object
    metadata           TEXT NOT NULL,            -- JSON object
    status             TEXT NOT NULL
        CHECK (status = 'queued' OR status = 'scheduled' OR status = 'completed'),
    ti_uuid            TEXT REFERENCES task_instances (ti_uuid),
    predicted_ms       REAL NOT NULL,
    predicted_error_ms REAL NOT NULL,
    submit_time        REAL NOT NULL,
    dispatch_time      REAL,                     -- when the current TI accepted it
    completion_time    REAL,
    execution_time_ms  REAL,                     -- as reported by the TI
    result             TEXT,                     -- JSON; {"error": ...} when the task failed
    outcome            TEXT CHECK (outcome IN ('succeeded', 'failed')),
    result_expired     INTEGER NOT NULL DEFAULT 0 CHECK (result_expired IN (0, 1)),
    result_ti          TEXT,                     -- V5; a ti_uuid of task_instances
    prompt_tokens      INTEGER,                  -- V6
    completion_tokens  INTEGER,                  -- V6
    origin             TEXT NOT NULL DEFAULT 'queue' CHECK (origin IN ('queue', 'openai')), -- V7
    ttft_ms            REAL                      -- V7
) WITHOUT ROWID;

INSERT INTO tasks_v9 (task_id, model_name, task_input, metadata, status, ti_uuid,
                      predicted_ms, predicted_error_ms, submit_time, dispatch_time,
                      completion_time, execution_time_ms, result, outcome, result_expired,
                      result_ti, prompt_tokens, completion_tokens, origin, ttft_ms)
SELECT task_id, model_name, task_input, metadata, status, ti_uuid,
       predicted_ms, predicted_error_ms, submit_time, dispatch_time,
       completion_time, execution_time_ms, result, outcome, result_expired,
       result_ti, prompt_tokens, completion_tokens, origin, ttft_ms
FROM tasks;

DROP TABLE tasks;
ALTER TABLE tasks_v9 RENAME TO tasks;

-- The indexes of V1, V4 and V8, as they were.
CREATE INDEX tasks_completed_at ON tasks (completion_time) WHERE status = 'completed';
CREATE INDEX tasks_by_state ON tasks (coalesce(outcome, status), submit_time);
CREATE INDEX tasks_by_model ON tasks (model_name, coalesce(outcome, status), submit_time);
CREATE INDEX tasks_by_ti ON tasks (ti_uuid, coalesce(outcome, status), submit_time);
