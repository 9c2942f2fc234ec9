"""Running the real job in process, and reading what its ops reported."""

from __future__ import annotations

from typing import Any

import dagster as dg

from session_cleanup_dagster.definitions import defs
from session_cleanup_dagster.resources import AppDatabase

OPS = ("expire_sessions", "purge_declines", "remove_orphan_fingerprints")


def run_job(
    url: str,
    *,
    partition_key: str | None = None,
    op_config: dict[str, dict[str, Any]] | None = None,
    instance: dg.DagsterInstance | None = None,
    raise_on_error: bool = False,
    app_db: dict[str, Any] | None = None,
    run_id: str | None = None,
) -> dg.ExecuteInProcessResult:
    """Run session_cleanup_job in process; ``app_db`` sets the resource's other fields."""
    job = defs.resolve_job_def("session_cleanup_job")
    run_config = {"ops": {op: {"config": (op_config or {}).get(op, {})} for op in OPS}}
    return job.execute_in_process(
        run_config=run_config,
        resources={"app_db": AppDatabase(url=url, **(app_db or {}))},
        partition_key=partition_key,
        instance=instance,
        raise_on_error=raise_on_error,
        run_id=run_id,
    )


def output_metadata(result: dg.ExecuteInProcessResult, op: str) -> dict[str, Any]:
    for event in result.events_for_node(op):
        if event.event_type_value == "STEP_OUTPUT":
            data = event.event_specific_data
            return {key: value.value for key, value in data.metadata.items()}  # type: ignore[union-attr]
    raise AssertionError(f"{op} produced no output")


def failure_message(result: dg.ExecuteInProcessResult, op: str) -> str:
    for event in result.events_for_node(op):
        if event.event_type_value == "STEP_FAILURE":
            # The message with its causes, as the UI shows them ("Exceeded max_retries of 3"
            # is caused by the last attempt's error).
            error = event.event_specific_data.error  # type: ignore[union-attr]
            parts = []
            while error is not None:
                parts.append(error.message)
                error = error.cause
            return "\n".join(parts)
    raise AssertionError(f"{op} did not fail")


def attempts(result: dg.ExecuteInProcessResult, op: str) -> int:
    return 1 + sum(
        1 for event in result.events_for_node(op) if event.event_type_value == "STEP_UP_FOR_RETRY"
    )


def error_texts(result: dg.ExecuteInProcessResult) -> list[str]:
    """Every event message and every error (message, stack, causes) the run recorded."""
    texts = []
    for event in result.all_events:
        texts.append(event.message or "")
        error = getattr(event.event_specific_data, "error", None)
        while error is not None:
            texts.append(error.message)
            texts.extend(error.stack)
            error = error.cause or error.context
    return texts


def started_steps(result: dg.ExecuteInProcessResult) -> list[str]:
    return [e.step_key or "" for e in result.all_events if e.event_type_value == "STEP_START"]
