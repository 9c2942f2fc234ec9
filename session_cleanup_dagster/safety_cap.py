"""The safety cap (``max_rows``) counted per run: across an op's retries and the run's re-runs.

A transient error retries the op, and a crashed worker's run is re-run by run_retries; each
attempt starts its step afresh. So that a step never passes ``max_rows`` in one run, whatever
happens in between, each attempt keeps a running count in a run tag
(``session_cleanup/max_rows_used.<op>``), as the cutoff is kept (cutoff.py), and the next
attempt counts from it. Run retries copy the run's tags; the parent run's tag is read too.

The count is an upper bound. Before every batch it records the rows committed so far plus the
most that batch can commit, so a worker killed mid-batch counts that batch as done. It is
settled to the exact figure when the step ends, stops at the cap, or fails on a statement
(the batch was rolled back); a failure at COMMIT itself keeps the bound. Only runs with
``max_rows`` set pay for this: one run-storage write per batch.
"""

from __future__ import annotations

import dagster as dg
import sqlalchemy.exc

from session_cleanup_dagster import steps

TAG_PREFIX = "session_cleanup/max_rows_used."


class RowBudget:
    """One attempt's view of the rows its step has changed in this run."""

    def __init__(self, context: dg.OpExecutionContext, step: str, max_rows: int) -> None:
        self._context = context
        self._key = TAG_PREFIX + step
        self._max_rows = max_rows
        self._written: int | None = None
        self.committed = 0  # by this attempt
        self.changed_before = self._read()

    def _read(self) -> int:
        instance = self._context.instance
        run = instance.get_run_by_id(self._context.run_id)
        runs = [run]
        if run is not None and run.parent_run_id:
            runs.append(instance.get_run_by_id(run.parent_run_id))
        values = [int(r.tags[self._key]) for r in runs if r is not None and self._key in r.tags]
        return max(values, default=0)

    def _write(self, value: int) -> None:
        if value != self._written:
            self._context.instance.add_run_tags(self._context.run_id, {self._key: str(value)})
            self._written = value

    def before_batch(self, progress: steps.Progress) -> None:
        """Record what is committed plus the most the coming batch can add (never past the cap)."""
        self.committed = progress.changed
        done = self.changed_before + progress.changed
        self._write(min(self._max_rows, done + progress.next_batch_limit))

    def settle(self, committed: int) -> None:
        """The step ended (done, or stopped at the cap) with ``committed`` rows this attempt."""
        self.committed = committed
        self._write(self.changed_before + committed)

    def failed(self, exc: BaseException) -> None:
        """The step raised: if a statement failed, its batch was rolled back, so settle."""
        if isinstance(exc, sqlalchemy.exc.DBAPIError) and exc.statement is not None:
            self.settle(self.committed)
