-- ti-scheduler's whole state. The in-memory cache of the running service is rebuilt from
-- these tables at start-up; every scheduling decision can be inspected with plain SQL.
-- Times are Unix seconds (REAL, millisecond precision); durations are milliseconds (REAL).

-- Task Instances: one row per host:port ever registered. Removing a TI sets removed_at
-- and keeps the row, so history that names it stays meaningful; registering the same
-- host:port again revives the same ti_uuid.
CREATE TABLE task_instances (
    ti_uuid        TEXT PRIMARY KEY NOT NULL,
    host           TEXT NOT NULL,
    port           INTEGER NOT NULL CHECK (port BETWEEN 1 AND 65535),
    model_name     TEXT NOT NULL,
    hardware       TEXT,
    -- Secret the TI must echo in its result callbacks.
    callback_token TEXT NOT NULL,
    registered_at  REAL NOT NULL,
    removed_at     REAL,
    UNIQUE (host, port)
);

-- Tasks: one row per accepted submit, from `queued` to `completed`.
-- ti_uuid is the TI currently chosen for the task (null while none is usable);
-- predicted_ms / predicted_error_ms are the prediction on that TI, from which the queue
-- estimates are rebuilt after a restart.
CREATE TABLE tasks (
    task_id            TEXT PRIMARY KEY NOT NULL,
    model_name         TEXT NOT NULL,
    task_input         TEXT NOT NULL,            -- JSON object
    metadata           TEXT NOT NULL,            -- JSON object
    status             TEXT NOT NULL CHECK (status IN ('queued', 'scheduled', 'completed')),
    ti_uuid            TEXT REFERENCES task_instances (ti_uuid),
    predicted_ms       REAL NOT NULL,
    predicted_error_ms REAL NOT NULL,
    submit_time        REAL NOT NULL,
    dispatch_time      REAL,                     -- when the current TI accepted it
    completion_time    REAL,
    execution_time_ms  REAL,                     -- as reported by the TI
    result             TEXT,                     -- JSON; {"error": ...} when the task failed
    outcome            TEXT CHECK (outcome IN ('succeeded', 'failed')),
    result_expired     INTEGER NOT NULL DEFAULT 0 CHECK (result_expired IN (0, 1))
) WITHOUT ROWID;

-- Unfinished tasks are what start-up recovery and reconciliation read.
CREATE INDEX tasks_unfinished ON tasks (status, ti_uuid) WHERE status <> 'completed';
-- The cleanup job walks completed tasks by age.
CREATE INDEX tasks_completed_at ON tasks (completion_time) WHERE status = 'completed';

-- Scheduling decisions: one row per choice of a TI for a task (at submit, on a re-route).
-- candidates is a JSON array with every TI that was considered and the estimates it had:
--   [{"ti_uuid", "wait_ms", "wait_error_ms", "queue_length", "predicted_ms",
--     "predicted_error_ms", "prediction_source", "score"}]
-- Query it with json_each (see README.md).
CREATE TABLE decisions (
    id                 INTEGER PRIMARY KEY,
    task_id            TEXT NOT NULL REFERENCES tasks (task_id) ON DELETE CASCADE,
    decided_at         REAL NOT NULL,
    reason             TEXT NOT NULL CHECK (reason IN ('submit', 'reroute')),
    strategy           TEXT NOT NULL,
    predict_mode       TEXT NOT NULL,
    -- The prediction used for the chosen TI, and where it came from
    -- (learned, metadata_hint, lookup_table, running_mean, prior).
    predicted_ms       REAL NOT NULL,
    predicted_error_ms REAL NOT NULL,
    prediction_source  TEXT NOT NULL,
    -- True when lookup_table mode found no row and the default chain answered.
    lookup_fallback    INTEGER NOT NULL CHECK (lookup_fallback IN (0, 1)),
    chosen_ti          TEXT NOT NULL REFERENCES task_instances (ti_uuid),
    candidates         TEXT NOT NULL
);
CREATE INDEX decisions_task ON decisions (task_id);

-- Service settings that survive restarts: 'strategy' and 'predict_mode'.
CREATE TABLE settings (
    key   TEXT PRIMARY KEY NOT NULL,
    value TEXT NOT NULL
) WITHOUT ROWID;

-- Pre-computed predictions for lookup_table mode (SPEC.md §6).
-- features is a JSON object of numeric feature values ({"input_tokens": 512, ...});
-- quantiles a JSON object of quantile -> ms ({"0.5": 1000.0, ...}).
CREATE TABLE lookup_rows (
    id         INTEGER PRIMARY KEY,
    model_name TEXT NOT NULL,
    hardware   TEXT,
    features   TEXT NOT NULL,
    expect_ms  REAL NOT NULL,
    error_ms   REAL NOT NULL,
    quantiles  TEXT NOT NULL
);
CREATE INDEX lookup_rows_model ON lookup_rows (model_name);

-- Running statistics of actual execution times, per model and hardware ('' = any
-- hardware), for the running-mean step of the prediction fallback chain (Welford: m2 is
-- the sum of squared deviations).
CREATE TABLE execution_stats (
    model_name TEXT NOT NULL,
    hardware   TEXT NOT NULL,
    n          INTEGER NOT NULL,
    mean_ms    REAL NOT NULL,
    m2         REAL NOT NULL,
    PRIMARY KEY (model_name, hardware)
) WITHOUT ROWID;
