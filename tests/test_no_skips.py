"""The suite's own rule: a skipped test fails the run (tests/no_skips.py), as pytest runs it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _pytest(tmp_path: Path, body: str) -> subprocess.CompletedProcess[str]:
    (tmp_path / "test_sample.py").write_text(body)
    return subprocess.run(
        [
            *(sys.executable, "-m", "pytest", "-p", "tests.no_skips", "-p", "no:cacheprovider"),
            *("--rootdir", str(tmp_path), str(tmp_path)),
        ],
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_a_skipped_test_fails_the_run_and_is_named(tmp_path: Path) -> None:
    body = (
        "import pytest\n\ndef test_gone():\n    pytest.skip('no server')\n\n"
        "def test_ok():\n    pass\n"
    )
    result = _pytest(tmp_path, body)
    assert result.returncode == 1, result.stdout
    assert "skipped tests fail this suite" in result.stdout
    assert "SKIPPED test_sample.py::test_gone" in result.stdout


def test_a_module_skipped_at_collection_fails_the_run(tmp_path: Path) -> None:
    body = "import pytest\n\npytest.skip('linux only', allow_module_level=True)\n"
    result = _pytest(tmp_path, body)
    assert result.returncode != 0, result.stdout
    assert "SKIPPED test_sample.py" in result.stdout


def test_a_run_without_skips_passes(tmp_path: Path) -> None:
    result = _pytest(tmp_path, "def test_ok():\n    pass\n")
    assert result.returncode == 0, result.stdout
