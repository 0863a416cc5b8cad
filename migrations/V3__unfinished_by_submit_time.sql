-- The unfinished tasks, oldest first: what start-up and every sweep read
-- (`SELECT … WHERE status <> 'completed' ORDER BY submit_time`). Keyed by submit time,
-- new entries append at the end of the index and the hot path's changes (accepted,
-- completed) stay in its last pages, where V1's (status, ti_uuid) key spread them over
-- one range per status and TI; the query no longer sorts either.
DROP INDEX tasks_unfinished;
CREATE INDEX tasks_unfinished ON tasks (submit_time) WHERE status <> 'completed';
