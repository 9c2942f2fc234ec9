"""The three cleanup steps as plain functions over a SQLAlchemy engine. No Dagster here.

Each step walks its table once, in batches, and each batch is its own short transaction
that changes only rows matching the step's condition, re-checked by the writing statement
on the row itself. Rows the app holds locked are skipped (``SKIP LOCKED``) and left for the
next run; a batch never waits on the app for more than ``FAST_LOCK_TIMEOUT_MS``.

Batches are sized by time (``StepOptions.target_batch_ms``, at most ``batch_size`` rows):
a fixed small batch pays a round trip per few hundred rows, a fixed large one holds locks
too long. Only one batch of ids (usually none) is ever in the client. The walk never
rescans what it has passed, so the total work is linear in the table size even where no
index serves the condition:

- ``purge_declines`` walks the heap in physical order by windows of ``ctid`` pages (TID
  range scans, PostgreSQL 14+). The reference schema has no index on
  ``after_hours_declines.created_at``, so ``WHERE created_at < x LIMIT n`` re-run per batch
  would rescan the already-cleaned prefix every time: quadratic. See ``_HeapWalk``. Where
  the app has a B-tree index on ``created_at`` and few rows are due, it walks that index
  like ``expire_sessions`` (``_KeysetWalk``).
- ``remove_orphan_fingerprints`` walks the index on ``session_id`` by key ranges, so its
  joins with the sessions' primary key run in key order: once to find the orphans' session
  ids (probing or merging, whichever measures faster), once more to delete their
  fingerprints. See ``_OrphanWalk``.
- ``expire_sessions`` walks the partial index on open sessions, keyset on (expires_at, id),
  when few sessions are due, and the heap like the others when many are (``_IndexOrHeap``).

One module per walk: ``loop`` (the batch loop, pacing and options all steps share),
``heap`` (one pass over the heap), ``keyset`` (the index walk; ``expire_sessions`` and
``purge_declines``), ``orphans`` (``remove_orphan_fingerprints``). The numbers behind
these choices are in docs/design.md and benchmarks/README.md.

A dry run walks the same way without locking or changing a row of the app's (the orphan
step still fills its own temporary table), so its counts equal a real run's on the same data.
"""

from session_cleanup_dagster.steps.keyset import expire_sessions, purge_declines
from session_cleanup_dagster.steps.loop import (
    ASYNC_COMMIT,
    SAMPLE_SIZE,
    BeforeBatch,
    Progress,
    SafetyCapExceeded,
    StepOptions,
    StepResult,
    batch_transaction,
    database_now,
)
from session_cleanup_dagster.steps.orphans import remove_orphan_fingerprints

__all__ = [
    "ASYNC_COMMIT",
    "SAMPLE_SIZE",
    "BeforeBatch",
    "Progress",
    "SafetyCapExceeded",
    "StepOptions",
    "StepResult",
    "batch_transaction",
    "database_now",
    "expire_sessions",
    "purge_declines",
    "remove_orphan_fingerprints",
]
