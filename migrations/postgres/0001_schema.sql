-- ti-scheduler's whole state on PostgreSQL: the schema that the SQLite migrations
-- V1..V7 build (migrations/V*.sql explain every table and column), in PostgreSQL's types,
-- and the leader lease of high availability (SPEC.md §12). Later changes come as
-- 0002_*.sql and so on, applied by sqlx's migrator.
-- Times are Unix seconds (DOUBLE PRECISION, millisecond precision); durations are
-- milliseconds. JSON is stored as TEXT, as on SQLite, so both backends return the bytes
-- they were given.

CREATE TABLE task_instances (
    ti_uuid         TEXT PRIMARY KEY NOT NULL,
    host            TEXT NOT NULL,
    port            BIGINT NOT NULL CHECK (port BETWEEN 1 AND 65535),
    model_name      TEXT NOT NULL,
    hardware        TEXT,
    callback_token  TEXT NOT NULL,
    registered_at   DOUBLE PRECISION NOT NULL,
    removed_at      DOUBLE PRECISION,
    kind            TEXT NOT NULL DEFAULT 'callback' CHECK (kind IN ('callback', 'openai')),
    max_concurrency BIGINT
        CHECK (max_concurrency IS NULL OR max_concurrency BETWEEN 1 AND 1024),
    UNIQUE (host, port)
);

CREATE TABLE tasks (
    task_id            TEXT PRIMARY KEY NOT NULL,
    model_name         TEXT NOT NULL,
    task_input         TEXT NOT NULL,
    metadata           TEXT NOT NULL,
    status             TEXT NOT NULL CHECK (status IN ('queued', 'scheduled', 'completed')),
    ti_uuid            TEXT REFERENCES task_instances (ti_uuid),
    predicted_ms       DOUBLE PRECISION NOT NULL,
    predicted_error_ms DOUBLE PRECISION NOT NULL,
    submit_time        DOUBLE PRECISION NOT NULL,
    dispatch_time      DOUBLE PRECISION,
    completion_time    DOUBLE PRECISION,
    execution_time_ms  DOUBLE PRECISION,
    result             TEXT,
    outcome            TEXT CHECK (outcome IN ('succeeded', 'failed')),
    result_expired     BOOLEAN NOT NULL DEFAULT FALSE,
    result_ti          TEXT REFERENCES task_instances (ti_uuid),
    prompt_tokens      BIGINT,
    completion_tokens  BIGINT,
    origin             TEXT NOT NULL DEFAULT 'queue' CHECK (origin IN ('queue', 'openai')),
    ttft_ms            DOUBLE PRECISION
);

CREATE INDEX tasks_unfinished ON tasks (submit_time) WHERE status <> 'completed';
CREATE INDEX tasks_completed_at ON tasks (completion_time) WHERE status = 'completed';
CREATE INDEX tasks_by_state ON tasks (coalesce(outcome, status), submit_time);
CREATE INDEX tasks_by_model ON tasks (model_name, coalesce(outcome, status), submit_time);
CREATE INDEX tasks_by_ti ON tasks (ti_uuid, coalesce(outcome, status), submit_time);

CREATE TABLE decisions (
    id                 BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    task_id            TEXT NOT NULL REFERENCES tasks (task_id) ON DELETE CASCADE,
    decided_at         DOUBLE PRECISION NOT NULL,
    reason             TEXT NOT NULL CHECK (reason IN ('submit', 'reroute')),
    strategy           TEXT NOT NULL,
    predict_mode       TEXT NOT NULL,
    predicted_ms       DOUBLE PRECISION NOT NULL,
    predicted_error_ms DOUBLE PRECISION NOT NULL,
    prediction_source  TEXT NOT NULL,
    lookup_fallback    BOOLEAN NOT NULL,
    chosen_ti          TEXT NOT NULL REFERENCES task_instances (ti_uuid),
    candidates         TEXT NOT NULL
);
CREATE INDEX decisions_task ON decisions (task_id);

CREATE TABLE settings (
    key   TEXT PRIMARY KEY NOT NULL,
    value TEXT NOT NULL
);

CREATE TABLE lookup_rows (
    id         BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    model_name TEXT NOT NULL,
    hardware   TEXT,
    features   TEXT NOT NULL,
    expect_ms  DOUBLE PRECISION NOT NULL,
    error_ms   DOUBLE PRECISION NOT NULL,
    quantiles  TEXT NOT NULL
);
CREATE INDEX lookup_rows_model ON lookup_rows (model_name);

CREATE TABLE execution_stats (
    model_name TEXT NOT NULL,
    hardware   TEXT NOT NULL,
    n          BIGINT NOT NULL,
    mean_ms    DOUBLE PRECISION NOT NULL,
    m2         DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (model_name, hardware)
);

CREATE TABLE learned_models (
    model_name TEXT NOT NULL,
    hardware   TEXT NOT NULL,
    state      TEXT NOT NULL,
    PRIMARY KEY (model_name, hardware)
);

-- High availability (ha.enabled; docs/API.md, "Standby nodes"): the one leader lease. A node becomes leader by raising
-- epoch on an expired lease; it renews expires_at every third of ha.lease_ms. Every write
-- transaction of the leader first reads this row FOR SHARE and checks its epoch (fencing):
-- a leader that lost the lease cannot commit, and a take-over waits for a commit under
-- way. Times are the database's clock, so the nodes' clocks need not agree.
CREATE TABLE ha_lease (
    id         SMALLINT PRIMARY KEY CHECK (id = 1),
    epoch      BIGINT NOT NULL,
    holder     TEXT,                         -- the leader's ha.node_id
    url        TEXT,                         -- the leader's server.public_url
    expires_at TIMESTAMPTZ NOT NULL
);
INSERT INTO ha_lease (id, epoch, holder, url, expires_at) VALUES (1, 0, NULL, NULL, '-infinity');
