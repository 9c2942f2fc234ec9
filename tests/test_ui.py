"""The operator's UI, driven in a real browser: Debian's chromium through Playwright.

Touches: the whole stack as deployed (tests/ui_stack.py: dagster-webserver and dagster-daemon
subprocesses, Postgres run storage, the queued run coordinator, run workers, the backfill
daemon and the run-status sensors) on a seeded scratch app database. Every run launched here
is checked against tests.model on the whole database state.

The tests run in file order and share one stack: the backfill's runs change the data the real
run then sees. Screenshots go to a temporary directory, or to $SESSION_CLEANUP_SCREENSHOTS
(``docs`` regenerates the README's pictures).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from datetime import UTC, date, datetime, time, timedelta
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import Browser, Page, expect, sync_playwright
from session_cleanup_dev.seed import seed_database

from session_cleanup_dagster.checks import CHECKS_JOB
from tests import data, model, pg
from tests.ui_stack import Stack, ui_stack

pytestmark = pytest.mark.slow  # ./run test starts the long modules first

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
LOCATION = "/locations/session_cleanup_dagster"
SESSIONS_ASSET = "/assets/app_database/after_hours_sessions"


def _last_ended_partition() -> date:
    """The newest day whose window (to 04:00 UTC the day after) has ended."""
    return (datetime.now(UTC) - timedelta(hours=4)).date() - timedelta(days=1)


def _cutoff(day: date) -> datetime:
    return datetime.combine(day + timedelta(days=1), time(4), tzinfo=UTC)


@pytest.fixture(scope="module")
def app_url(admin_url: str) -> Iterator[str]:
    """The stack's app database, seeded once for the module (replaces conftest's per test)."""
    with pg.scratch_database(admin_url) as url:
        engine = pg.engine(url)
        try:
            seed_database(engine, 2000)
        finally:
            engine.dispose()
        yield url


@pytest.fixture(scope="module")
def stack(admin_url: str, app_url: str) -> Iterator[Stack]:
    start = (_last_ended_partition() - timedelta(days=9)).isoformat()
    with pg.scratch_database(admin_url) as storage_url, ui_stack(app_url, storage_url, start) as s:
        yield s


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser: Browser, stack: Stack) -> Iterator[Page]:
    context = browser.new_context(base_url=stack.url, viewport={"width": 1400, "height": 900})
    # The first visit shows a newsletter dialog over the page; mark it as dismissed.
    context.add_init_script("window.localStorage.setItem('communityNux', 'true')")
    context.set_default_timeout(60_000)
    # The same patience for assertions: on a loaded 2-core machine the job graph took over
    # expect()'s default 5 s to render (seen once in a full suite run beside other work).
    expect.set_options(timeout=60_000)
    page = context.new_page()
    yield page
    context.close()


@pytest.fixture(scope="module")
def shots(tmp_path_factory: pytest.TempPathFactory) -> Path:
    target = os.environ.get("SESSION_CLEANUP_SCREENSHOTS")
    if not target:
        return tmp_path_factory.mktemp("screenshots")
    Path(target).mkdir(parents=True, exist_ok=True)
    return Path(target)


def _shot(page: Page, shots: Path, name: str, *, full_page: bool = False) -> None:
    page.screenshot(path=shots / f"{name}.png", full_page=full_page)
    assert (shots / f"{name}.png").stat().st_size > 10_000


def _wait_for_run_success(page: Page) -> str:
    page.wait_for_url(re.compile(r".*/runs/[0-9a-f-]{36}"), timeout=60_000)
    run_id = page.url.rsplit("/", 1)[-1]
    expect(page.get_by_text("Success", exact=True).first).to_be_visible(timeout=180_000)
    return run_id


def _tags(stack: Stack, job: str, run_id: str) -> dict[str, str]:
    [run] = [r for r in stack.runs(job) if r["runId"] == run_id]
    assert run["status"] == "SUCCESS"
    return {tag["key"]: tag["value"] for tag in run["tags"]}


def _materializations(stack: Stack) -> list[dict[str, Any]]:
    data = stack.graphql(
        """{ assetOrError(assetKey: {path: ["app_database", "after_hours_sessions"]}) {
              ... on Asset { assetMaterializations { runId metadataEntries {
                label ... on IntMetadataEntry { intValue } } } } } }"""
    )
    return data["assetOrError"]["assetMaterializations"]  # type: ignore[no-any-return]


def test_job_page_shows_the_three_ops(page: Page, shots: Path) -> None:
    page.goto(f"{LOCATION}/jobs/session_cleanup_job")
    for op in ("expire_sessions", "purge_declines", "remove_orphan_fingerprints"):
        expect(page.get_by_text(op, exact=True).first).to_be_attached()
    expect(page.get_by_text("expire_sessions", exact=True).first).to_be_visible()
    _shot(page, shots, "ui-job")


def test_schedule_page_shows_the_cron_in_utc_and_running(page: Page, shots: Path) -> None:
    page.goto(f"{LOCATION}/schedules/session_cleanup_schedule")
    expect(page.get_by_text("(0 4 * * *)")).to_be_visible()
    timezone = page.get_by_role("row").filter(has_text="Execution timezone")
    expect(timezone).to_contain_text("UTC")
    running = page.get_by_role("row").filter(has_text="Running")
    expect(running.get_by_role("checkbox")).to_be_checked()
    _shot(page, shots, "ui-schedule")


def test_dry_run_from_the_launchpad_succeeds_and_shows_what_it_would_change(
    page: Page, stack: Stack, app_url: str, shots: Path
) -> None:
    before = pg.snapshot(app_url)
    page.goto(f"{LOCATION}/jobs/session_cleanup_dry_run_job/playground")
    expect(page.get_by_text("No errors")).to_be_visible()
    _shot(page, shots, "ui-dry-run-launchpad")
    page.get_by_role("button", name="Launch Run").click()
    run_id = _wait_for_run_success(page)
    assert pg.snapshot(app_url) == before
    page.get_by_placeholder("Filter…").fill("type:ASSET_OBSERVATION")
    rows = page.get_by_text("would_change", exact=True)
    expect(rows).to_have_count(3)
    expect(page.get_by_text("backlog_method", exact=True).first).to_be_visible()
    _shot(page, shots, "ui-dry-run")
    tags = _tags(stack, "session_cleanup_dry_run_job", run_id)
    assert tags["session_cleanup/dry_run"] == "true"
    assert tags["session_cleanup/exclusive"] == "app_db"  # it queued like a real run


def test_backfill_of_two_partitions_from_the_ui(
    page: Page, stack: Stack, app_url: str, shots: Path
) -> None:
    last = _last_ended_partition()
    days = [last - timedelta(days=2), last - timedelta(days=1)]
    before = pg.snapshot(app_url)
    page.goto(f"{LOCATION}/jobs/session_cleanup_job/partitions")
    page.get_by_role("button", name="Launch backfill…").click()
    box = page.get_by_placeholder(re.compile(r"^ex: \d{4}-"))
    box.fill(", ".join(day.isoformat() for day in days))
    box.press("Enter")
    page.get_by_role("button", name="Submit 2 runs").click()
    expect(page.get_by_text("Backfill ID")).to_be_visible()
    runs = stack.wait_for_runs("session_cleanup_job", 2)
    assert [r["status"] for r in runs] == ["SUCCESS", "SUCCESS"]
    partitions = sorted(
        tag["value"] for r in runs for tag in r["tags"] if tag["key"] == "dagster/partition"
    )
    assert partitions == [day.isoformat() for day in days]
    assert all(any(tag["key"] == "dagster/backfill" for tag in r["tags"]) for r in runs)
    # Runs of a later cutoff subsume earlier ones (the contract is monotone).
    assert pg.snapshot(app_url) == model.cleanup(before, _cutoff(days[-1]))
    assert stack.wait_for_backfills() == ["COMPLETED_SUCCESS"]
    page.reload()
    expect(page.get_by_text("Succeeded", exact=True).first).to_be_visible()
    _shot(page, shots, "ui-backfill")


def test_real_run_from_the_launchpad_adds_a_point_to_the_table_plots(
    page: Page, stack: Stack, app_url: str, shots: Path
) -> None:
    last = _last_ended_partition()
    before = pg.snapshot(app_url)
    points = len(_materializations(stack))
    page.goto(f"{LOCATION}/jobs/session_cleanup_job/playground")
    box = page.get_by_placeholder("Partition")
    box.click()
    box.press_sequentially(last.isoformat())
    try:
        page.get_by_role("menuitem").filter(has_text=last.isoformat()).first.click()
    except Exception:
        _shot(page, shots, "failed-partition-picker")
        raise
    expect(page.get_by_text(f"partition: {last.isoformat()}")).to_be_visible()
    page.get_by_role("button", name="Launch Run").click()
    run_id = _wait_for_run_success(page)
    assert pg.snapshot(app_url) == model.cleanup(before, _cutoff(last))
    latest = _materializations(stack)
    assert len(latest) == points + 1 and latest[0]["runId"] == run_id
    page.goto(SESSIONS_ASSET)
    page.get_by_role("button", name="Plots").click()
    for label in ("rows_changed", "backlog_rows", "duration_s", "cutoff_epoch_s"):
        expect(page.get_by_text(label, exact=True)).to_be_visible()
    page.set_viewport_size({"width": 1400, "height": 1500})
    page.get_by_role("button", name="Plots").scroll_into_view_if_needed()
    page.wait_for_timeout(1000)  # let the charts finish their entry animation
    _shot(page, shots, "ui-asset-plots")


def test_slo_checks_run_after_the_cleanup_and_show_on_the_asset(
    page: Page, stack: Stack, shots: Path
) -> None:
    def tags(run: dict[str, Any]) -> dict[str, str]:
        return {tag["key"]: tag["value"] for tag in run["tags"]}

    cleanups = stack.runs("session_cleanup_job")
    [launched] = [run for run in cleanups if "dagster/backfill" not in tags(run)]
    # One checks run per finished cleanup run (two from the backfill, one from the launchpad).
    checks = stack.wait_for_runs(CHECKS_JOB, len(cleanups), timeout=240)
    after = {tags(run)["session_cleanup/after_run"]: run["status"] for run in checks}
    assert after == {run["runId"]: "SUCCESS" for run in cleanups}
    assert launched["runId"] in after
    page.goto(f"{SESSIONS_ASSET}?view=checks")
    expect(page.get_by_text("no_overdue_open_sessions").first).to_be_visible()
    expect(page.get_by_text("Passed").first).to_be_visible()
    _shot(page, shots, "ui-checks")


def test_a_check_launched_from_the_asset_page_fails_with_count_and_ids(
    page: Page, stack: Stack, app_url: str, shots: Path
) -> None:
    overdue = data.uid(990_001)
    data.insert_user(app_url, "ui_overdue_user")
    data.insert_session(app_url, overdue, "ui_overdue_user", datetime.now(UTC) - timedelta(days=3))
    runs_before = len(stack.runs("__ASSET_JOB")) + len(stack.runs(CHECKS_JOB))
    page.goto(f"{SESSIONS_ASSET}?view=checks")
    # The button's accessible name starts with its icon's name; "Execute all" is another one.
    page.get_by_role("button", name=re.compile(r"^(\S+ )?Execute$")).click()
    expect(page.get_by_text("Failed", exact=True).first).to_be_visible(timeout=180_000)
    expect(page.get_by_text(str(overdue))).to_be_visible()
    offending = page.get_by_role("row").filter(has_text="offending_rows")
    expect(offending).to_contain_text("1")
    _shot(page, shots, "ui-check-failed")
    assert len(stack.runs("__ASSET_JOB")) + len(stack.runs(CHECKS_JOB)) == runs_before + 1
