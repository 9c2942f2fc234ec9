"""dagster-webserver and dagster-daemon as two process groups: the dev command's and the tests'.

Each process leads a process group of its own, so a signal to the group also reaches its
code server and any run worker, and stopping it can check that nothing of the group is left.
A Ctrl-C in the terminal reaches only the process that started them, which decides the order
of the shutdown.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable
from contextlib import suppress
from pathlib import Path
from typing import IO

Echo = Callable[[str], None]

STOP_TIMEOUT_S = 20.0


def dagster_commands(bin_dir: Path, workspace: Path, host: str, port: int) -> dict[str, list[str]]:
    """The daemon's and the webserver's command lines, daemon first."""
    return {
        "daemon": [str(bin_dir / "dagster-daemon"), "run", "-w", str(workspace)],
        "webserver": [
            str(bin_dir / "dagster-webserver"),
            "-h",
            host,
            "-p",
            str(port),
            "-w",
            str(workspace),
        ],
    }


def group_alive(pgid: int) -> bool:
    """Whether any process of the group ``pgid`` is left (a zombie leader counts)."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def signal_group(pgid: int, sig: int) -> None:
    """Send ``sig`` to the group ``pgid``, if it still exists."""
    with suppress(ProcessLookupError):
        os.killpg(pgid, sig)


class ProcessGroups:
    """Named children, each leading a process group of its own."""

    def __init__(self, env: dict[str, str], cwd: Path) -> None:
        self.env = env
        self.cwd = cwd
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, name: str, command: list[str], output: IO[bytes] | None = None) -> None:
        """Start ``command``; its output goes to ``output``, else to this process's."""
        self.procs[name] = subprocess.Popen(  # noqa: S603 - our own fixed command lines
            command,
            cwd=self.cwd,
            env=self.env,
            stdout=output,
            stderr=subprocess.STDOUT if output is not None else None,
            start_new_session=True,
        )

    def exited(self) -> str | None:
        """Which child has exited, if any."""
        for name, proc in self.procs.items():
            if proc.poll() is not None:
                return f"{name} exited with code {proc.returncode}"
        return None

    def stop(
        self,
        names: list[str],
        echo: Echo,
        sig: int = signal.SIGTERM,
        timeout_s: float = STOP_TIMEOUT_S,
    ) -> None:
        """Signal each named group (in this order), wait, SIGKILL what is left after a bound.

        Returns once every process of those groups is gone.
        """
        procs = {name: self.procs.pop(name) for name in names if name in self.procs}
        for proc in procs.values():
            signal_group(proc.pid, sig)
        deadline = time.monotonic() + timeout_s
        for name, proc in procs.items():
            while time.monotonic() < deadline and (group_alive(proc.pid) or proc.poll() is None):
                with suppress(subprocess.TimeoutExpired):
                    proc.wait(0.2)
            if group_alive(proc.pid):
                echo(f"{name}: still running after {timeout_s:.0f} s; killing its group.")
                signal_group(proc.pid, signal.SIGKILL)
            proc.wait()
            end = time.monotonic() + 10
            while group_alive(proc.pid) and time.monotonic() < end:
                time.sleep(0.1)
            if group_alive(proc.pid):
                raise RuntimeError(f"{name}: process group {proc.pid} still alive after SIGKILL")
            echo(f"{name} stopped.")

    def kill(self) -> None:
        """SIGKILL every group at once: a crash of the whole stack."""
        for proc in self.procs.values():
            signal_group(proc.pid, signal.SIGKILL)
        for proc in self.procs.values():
            proc.wait(10)
        self.procs.clear()
