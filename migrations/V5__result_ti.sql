-- Which TI's outcome a completed task holds. After a re-route, the TI a task was moved
-- away from may still finish it first, and its result then wins (the first valid result
-- is stored): `ti_uuid` names the TI the task was last routed to, `result_ti` the one whose
-- result (or error) is stored. Set by every completion; NULL while the task is unfinished,
-- and for tasks completed before this migration.
ALTER TABLE tasks ADD COLUMN result_ti TEXT REFERENCES task_instances (ti_uuid);
