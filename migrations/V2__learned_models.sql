-- The learned execution-time models of `default` mode (src/predictor/learned.rs): one
-- recursive-least-squares regression per model and hardware ('' = all hardware together),
-- updated with every successful completion. state is JSON:
--   {"n", "theta": [intercept_ms, ms_per_1000_input_tokens, ms_per_1000_output_tokens],
--    "p": 3x3 matrix, "residuals", "residual_sq_sum"}
-- `ti-scheduler retrain` rebuilds this table (and execution_stats) from the task history.
CREATE TABLE learned_models (
    model_name TEXT NOT NULL,
    hardware   TEXT NOT NULL,
    state      TEXT NOT NULL,
    PRIMARY KEY (model_name, hardware)
) WITHOUT ROWID;
