"""The safety valve (max_rows) through the whole job: loud failure, whole batches, finishable.

Touches: the job through execute_in_process on a seeded database (300 users: 1,500 sessions,
1,500 declines, 450 fingerprints); the whole state before and after is compared to
tests.model. Property tests of the cap at the step level are in tests/test_properties.py.
"""

from __future__ import annotations

from typing import Any

import dagster as dg

from tests import data, model, pg
from tests.data import T
from tests.jobrun import attempts, failure_message, output_metadata, run_job


def failure_metadata(result: dg.ExecuteInProcessResult, op: str) -> dict[str, Any]:
    for event in result.events_for_node(op):
        if event.event_type_value == "STEP_FAILURE":
            data = event.event_specific_data.user_failure_data  # type: ignore[union-attr]
            assert data is not None
            return {key: value.value for key, value in data.metadata.items()}
    raise AssertionError(f"{op} did not fail")


def changed_ids(before: pg.Snapshot, after: pg.Snapshot, table: str) -> set[Any]:
    remaining = {row["id"]: row for row in after[table]}
    return {row["id"] for row in before[table] if remaining.get(row["id"]) != row}


def test_run_past_max_rows_fails_loudly_with_counts_and_leaves_whole_batches(
    app_url: str,
) -> None:
    before = data.seed(app_url, 300)
    expected = model.cleanup(before, T)
    due = {
        table: changed_ids(before, expected, table)
        for table in ("after_hours_sessions", "after_hours_declines")
    }
    assert len(due["after_hours_sessions"]) > 100 and len(due["after_hours_declines"]) > 250

    result = run_job(
        app_url,
        partition_key="2026-11-27",
        op_config={
            "expire_sessions": {"batch_size": 40, "target_batch_ms": 0, "max_rows": 100},
            "purge_declines": {"batch_size": 100, "max_rows": 250},
        },
    )
    assert not result.success
    after = pg.snapshot(app_url)

    # expire_sessions: whole batches up to the cap; the batch that would pass it was rolled
    # back whole. (Batch sizes adapt to how densely rows match, so only the relations are fixed.)
    message = failure_message(result, "expire_sessions")
    meta = failure_metadata(result, "expire_sessions")
    assert meta["max_rows"] == 100
    assert meta["rows_changed"] <= 100 < meta["rows_changed"] + meta["next_batch"]
    assert (
        f"expire_sessions stopped at its safety cap: it changed {meta['rows_changed']} rows, and "
        f"the next batch of {meta['next_batch']} would have taken it past max_rows=100. That "
        "batch was rolled back" in message
    )
    assert attempts(result, "expire_sessions") == 1
    ended = changed_ids(before, after, "after_hours_sessions")
    assert len(ended) == meta["rows_changed"] and ended <= due["after_hours_sessions"]

    # purge_declines: whatever its batches were, exactly rows_changed rows went, all due.
    meta = failure_metadata(result, "purge_declines")
    assert meta["max_rows"] == 250
    assert meta["rows_changed"] <= 250 < meta["rows_changed"] + meta["next_batch"]
    assert f"it changed {meta['rows_changed']} rows" in failure_message(result, "purge_declines")
    purged = changed_ids(before, after, "after_hours_declines")
    assert len(purged) == meta["rows_changed"] and purged <= due["after_hours_declines"]

    # Every changed row is as the contract says; the uncapped step finished normally.
    for table, ids in (("after_hours_sessions", ended), ("after_hours_declines", purged)):
        want = {row["id"]: row for row in expected[table]}
        for row in after[table]:
            assert row == (want[row["id"]] if row["id"] in ids else _old(before, table, row))
    assert result.is_node_success("remove_orphan_fingerprints")
    assert after["device_fingerprints"] == expected["device_fingerprints"]
    assert after["users"] == before["users"]

    # A dry run ignores the cap and reports the full remaining count; a run without it finishes.
    dry = run_job(
        app_url,
        partition_key="2026-11-27",
        op_config={"expire_sessions": {"dry_run": True, "max_rows": 100}},
    )
    remaining = len(due["after_hours_sessions"]) - len(ended)
    assert output_metadata(dry, "expire_sessions")["rows_matched"] == remaining
    again = run_job(app_url, partition_key="2026-11-27")
    assert again.success
    assert pg.snapshot(app_url) == expected


def _old(before: pg.Snapshot, table: str, row: dict[str, Any]) -> dict[str, Any]:
    return next(r for r in before[table] if r["id"] == row["id"])


def test_the_cap_counts_across_the_retries_of_a_transient_fault_mid_step(app_url: str) -> None:
    """A transient fault in the middle of the step retries the op; the cap holds for the run."""
    before = data.seed(app_url, 300)
    expected = model.cleanup(before, T)
    due = changed_ids(before, expected, "after_hours_sessions")
    assert len(due) > 200
    # The fault: the 61st row the step updates fails with serialization_failure (transient),
    # once (a sequence counts outside the transaction that the error rolls back).
    pg.execute(
        app_url,
        """
        CREATE SEQUENCE sct_fault_seq;
        CREATE FUNCTION sct_fault() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
          IF nextval('sct_fault_seq') = 61 THEN
            RAISE EXCEPTION 'injected fault' USING ERRCODE = '40001';
          END IF;
          RETURN NEW;
        END $$;
        CREATE TRIGGER sct_fault BEFORE UPDATE ON after_hours_sessions
          FOR EACH ROW EXECUTE FUNCTION sct_fault();
        """,
    )
    result = run_job(
        app_url,
        partition_key="2026-11-27",
        op_config={"expire_sessions": {"batch_size": 40, "target_batch_ms": 0, "max_rows": 100}},
    )
    assert attempts(result, "expire_sessions") == 2  # the fault, then the cap: not retried
    meta = failure_metadata(result, "expire_sessions")
    ended = changed_ids(before, pg.snapshot(app_url), "after_hours_sessions")
    assert len(ended) == meta["rows_changed"] <= 100 < meta["rows_changed"] + meta["next_batch"]
    assert "in earlier attempts of this run" in failure_message(result, "expire_sessions")
    table = "after_hours_sessions"
    want = {row["id"]: row for row in expected[table]}
    for row in pg.snapshot(app_url)[table]:
        assert row == (want[row["id"]] if row["id"] in ended else _old(before, table, row))
