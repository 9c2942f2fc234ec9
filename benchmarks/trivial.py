"""A trivial 3-op Dagster job: the yardstick for this project's fixed overhead per run."""

import dagster as dg


@dg.op
def first() -> int:
    return 1


@dg.op
def second() -> int:
    return 2


@dg.op
def third() -> int:
    return 3


@dg.job(executor_def=dg.in_process_executor)
def trivial_job() -> None:
    first()
    second()
    third()


@dg.job(executor_def=dg.multiprocess_executor)
def trivial_multiprocess_job() -> None:
    first()
    second()
    third()
