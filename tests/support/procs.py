"""Start, signal and always reap ``tether`` role subprocesses for the chaos tests.

:class:`ProcessGroup` starts ``tether worker`` / ``tether scheduler`` as real processes with a
clean ``TETHER_*`` environment (``tests/support`` first on ``PYTHONPATH`` so they can import
:mod:`crash_agents`), stdout and stderr in one log file per process, and delivers SIGKILL,
SIGSTOP, SIGCONT and SIGTERM. :meth:`ProcessGroup.cleanup` (the ``procs`` fixture's finaliser in
``tests/chaos/conftest.py``) reaps every process it started, stopped ones included, whatever the
test's outcome. On Linux each child also asks the kernel to SIGKILL it when the test process
dies (``PR_SET_PDEATHSIG``), so not even a killed pytest leaves orphans behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

SUPPORT_DIR = Path(__file__).resolve().parent
REPO_ROOT = SUPPORT_DIR.parents[1]

#: Runs ``tether.cli`` like ``python -m tether.cli ...`` after arming the parent-death signal.
#: The check of the parent pid closes the race where the parent died before ``prctl``.
LAUNCHER_GUARD = """\
import ctypes, os, runpy, signal, sys
try:
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
except (OSError, AttributeError):
    pass
if os.getppid() != int(os.environ["TETHER_TEST_PARENT_PID"]):
    sys.exit(70)
"""
LAUNCHER_RUN = """\
sys.argv = ["tether", *sys.argv[1:]]
runpy.run_module("tether.cli", run_name="__main__", alter_sys=True)
"""
_LAUNCHER = LAUNCHER_GUARD + LAUNCHER_RUN

READY_LINES = {
    "worker": " running ",  # "worker <id> running N slot(s) for agents ..."
    "scheduler": "scheduler running",
}


def tether_env(
    database_url: str,
    *,
    lease_ttl: float = 10.0,
    poll_interval: float = 0.1,
    reaper_interval: float = 0.2,
    agent_modules: str = "crash_agents",
    default_agent: str = "crash_twenty",
    log_level: str = "INFO",
    **extra: str,
) -> dict[str, str]:
    """``os.environ`` without any inherited ``TETHER_*`` setting, plus the given ones."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TETHER_")}
    env.update(
        TETHER_DATABASE_URL=database_url,
        TETHER_AGENT_MODULES=agent_modules,
        TETHER_DEFAULT_AGENT=default_agent,
        TETHER_LEASE_TTL=str(lease_ttl),
        TETHER_POLL_INTERVAL=str(poll_interval),
        TETHER_REAPER_INTERVAL=str(reaper_interval),
        TETHER_LOG_LEVEL=log_level,
        TETHER_TEST_PARENT_PID=str(os.getpid()),
        PYTHONUNBUFFERED="1",
        **extra,
    )
    path = [str(SUPPORT_DIR), str(REPO_ROOT)]
    if env.get("PYTHONPATH"):
        path.append(env["PYTHONPATH"])
    env["PYTHONPATH"] = os.pathsep.join(path)
    return env


class TetherProcess:
    """One ``tether`` role process. Times are ``time.time()`` in the test process."""

    def __init__(self, name: str, role: str, popen: subprocess.Popen[bytes], log_path: Path,
                 log_file: IO[bytes], spawned_at: float) -> None:  # fmt: skip
        self.name = name
        self.role = role
        self.popen = popen
        self.log_path = log_path
        self._log_file = log_file
        #: just before the process was created: nothing it stamps can be earlier
        self.spawned_at = spawned_at
        #: just after it was reaped: nothing it stamps can be later
        self.ended_at: float | None = None
        self.stopped = False

    @property
    def pid(self) -> int:
        return self.popen.pid

    @property
    def alive(self) -> bool:
        return self.popen.poll() is None

    def __repr__(self) -> str:
        return f"<{self.name} pid={self.pid} rc={self.popen.returncode}>"

    # -- signals -------------------------------------------------------------------------------

    def signal(self, sig: int) -> None:
        if self.alive:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, sig)

    def kill(self) -> None:
        """SIGKILL and reap (works on a stopped process too)."""
        self.signal(signal.SIGKILL)
        self._reap(10.0)

    def stop(self) -> None:
        """SIGSTOP: the process freezes mid-whatever, its leases stop being renewed."""
        self.signal(signal.SIGSTOP)
        self.stopped = True

    def cont(self) -> None:
        """SIGCONT: a stopped process resumes where it was (a zombie, if its lease expired)."""
        self.signal(signal.SIGCONT)
        self.stopped = False

    def terminate(self, grace: float = 5.0) -> int | None:
        """SIGTERM (graceful shutdown); SIGKILL if it is still running after ``grace``."""
        if self.stopped:
            self.cont()
        self.signal(signal.SIGTERM)
        try:
            self._reap(grace)
        except subprocess.TimeoutExpired:
            self.kill()
        return self.popen.returncode

    def _reap(self, timeout: float) -> None:
        self.popen.wait(timeout)
        if self.ended_at is None:
            self.ended_at = time.time()
        with contextlib.suppress(OSError):
            self._log_file.close()

    # -- logs ----------------------------------------------------------------------------------

    def log(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def tail(self, lines: int = 25) -> str:
        text = self.log().splitlines()[-lines:]
        return f"--- {self.name} ({self.log_path}) ---\n" + "\n".join(text)

    async def wait_for_log(self, text: str, timeout: float = 30.0) -> None:
        """Wait until ``text`` appears in the log; fail early if the process exits."""
        deadline = time.monotonic() + timeout
        while text not in self.log():
            if not self.alive:
                raise AssertionError(f"{self.name} exited ({self.popen.returncode})\n{self.tail()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"{self.name}: no {text!r} in {timeout}s\n{self.tail()}")
            await asyncio.sleep(0.02)

    async def wait_ready(self, timeout: float = 30.0) -> None:
        await self.wait_for_log(READY_LINES[self.role], timeout)


class ProcessGroup:
    """Every process a test started; :meth:`cleanup` reaps them all."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.processes: list[TetherProcess] = []

    #: the ``python -c`` script that runs the role (a subclass may bring its own)
    launcher: str = _LAUNCHER

    def start(self, role: str, database_url: str, *args: str, **settings: Any) -> TetherProcess:
        """Start ``tether <role> <args>`` with :func:`tether_env` ``(database_url, **settings)``."""
        name = f"{role}-{sum(p.role == role for p in self.processes) + 1}"
        log_path = self.log_dir / f"{name}.log"
        log_file = open(log_path, "wb")  # noqa: SIM115 -- closed when the process is reaped
        spawned_at = time.time()
        popen = subprocess.Popen(
            [sys.executable, "-c", self.launcher, role, *args],
            env=tether_env(database_url, **settings),
            cwd=self.log_dir,
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # a Ctrl-C at the terminal is for pytest, not for these
        )
        proc = TetherProcess(name, role, popen, log_path, log_file, spawned_at)
        self.processes.append(proc)
        return proc

    def worker(self, database_url: str, *, concurrency: int = 1, **settings: Any) -> TetherProcess:
        return self.start("worker", database_url, "--concurrency", str(concurrency), **settings)

    def scheduler(self, database_url: str, **settings: Any) -> TetherProcess:
        return self.start("scheduler", database_url, **settings)

    def tails(self, lines: int = 25) -> str:
        return "\n".join(p.tail(lines) for p in self.processes)

    def cleanup(self) -> None:
        """Resume, SIGTERM, then SIGKILL whatever is still running, and reap everything."""
        live = [p for p in self.processes if p.alive]
        for p in live:
            p.cont()
            p.signal(signal.SIGTERM)
        deadline = time.monotonic() + 3.0
        for p in live:
            with contextlib.suppress(subprocess.TimeoutExpired):
                p._reap(max(deadline - time.monotonic(), 0.01))
        for p in self.processes:
            if p.alive:
                p.kill()
            else:
                p._reap(1.0)


async def wait_until(
    predicate: Callable[[], Any],
    timeout: float,
    what: str | Callable[[], str],
    interval: float = 0.01,
) -> Any:
    """Poll an (async or sync) ``predicate`` until it returns something truthy; return it.
    ``what`` (or what it returns, evaluated at the timeout) names the awaited condition."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(
                f"timed out after {timeout}s waiting for {what() if callable(what) else what}"
            )
        await asyncio.sleep(interval)
