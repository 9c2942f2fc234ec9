"""A pytest plugin that fails the run when any test was skipped.

The suite promises the same proofs on a fresh machine as on a developer's: a test that needs
something missing installs it or fails. A skip would pass quietly, so any skip (at collection
or in a test) turns an otherwise green run red and is named in the summary. The suite loads
this from tests/conftest.py; ``python -m pytest -p tests.no_skips`` loads it elsewhere.
"""

from __future__ import annotations

import pytest


class NoSkips:
    """Collects skipped node ids and fails the session if there are any."""

    def __init__(self) -> None:
        self.skipped: list[str] = []

    def pytest_collectreport(self, report: pytest.CollectReport) -> None:
        if report.skipped:
            self.skipped.append(report.nodeid)

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        if report.skipped and not hasattr(report, "wasxfail"):
            self.skipped.append(report.nodeid)

    def pytest_sessionfinish(self, session: pytest.Session, exitstatus: int) -> None:
        if self.skipped and exitstatus == pytest.ExitCode.OK:
            session.exitstatus = pytest.ExitCode.TESTS_FAILED

    def pytest_terminal_summary(self, terminalreporter: pytest.TerminalReporter) -> None:
        if self.skipped:
            terminalreporter.write_sep("=", "skipped tests fail this suite", red=True)
            for nodeid in self.skipped:
                terminalreporter.write_line(f"SKIPPED {nodeid}")


def pytest_configure(config: pytest.Config) -> None:
    if not config.pluginmanager.has_plugin("no-skips"):
        config.pluginmanager.register(NoSkips(), "no-skips")
