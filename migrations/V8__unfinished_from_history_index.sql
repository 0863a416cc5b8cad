-- tasks_unfinished (V3) held the unfinished tasks by submit time; tasks_by_state (V4)
-- holds them too: an unfinished task's state, coalesce(outcome, status), is 'queued' or
-- 'scheduled' (outcome is set only by COMPLETE, with status = 'completed'), and its
-- entries there are in submit_time order. The reads of unfinished tasks (start-up, the
-- sweep, their count, the tasks waiting for a TI) now name those two states and read
-- tasks_by_state's two ranges. Dropping the copy saves every task an index entry written
-- at submit and deleted at completion: about one page of every commit of the hot path.
DROP INDEX tasks_unfinished;
