"""A throwaway PostgreSQL cluster for one test: ``initdb``, ``pg_ctl start|stop``, always removed.

The scale-out chaos test (``tests/chaos/test_scale_out.py``) restarts PostgreSQL in the middle of
the run, so it must never touch the machine's shared server. :class:`PgCluster` creates a fresh
cluster in a temporary directory owned by the ``postgres`` user (``initdb`` refuses to run as
root, so every server command runs through ``runuser -u postgres`` when the test runs as root),
listens on a free port on 127.0.0.1 (and a Unix socket in the cluster's directory), with
``fsync=on`` so a crash-stop (``pg_ctl stop -m immediate``) followed by a start exercises real
WAL recovery. :meth:`PgCluster.destroy` stops the server and removes the directory; it is safe to
call at any point, twice, and after a failed start.

:func:`reap_orphans` removes clusters left behind by a test process that was itself SIGKILLed.

The binaries come from ``/usr/lib/postgresql/<version>/bin`` (the newest version found) or the
``PATH``. When ``initdb`` or ``pg_ctl`` is missing, :func:`find_pg_bin` raises
:class:`PgUnavailable` with what to install: the caller fails the test (a skipped test would hide
the missing dependency).
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

PREFIX = "tether-pg-"
#: the pid of the process that created the cluster (see :func:`reap_orphans`)
OWNER_FILE = "owner.pid"


class PgUnavailable(RuntimeError):
    """``initdb``/``pg_ctl`` are missing or the cluster cannot be created."""


def find_pg_bin() -> Path:
    """The directory holding ``initdb`` and ``pg_ctl`` (newest ``/usr/lib/postgresql/*``)."""
    candidates = sorted(
        glob.glob("/usr/lib/postgresql/*/bin"),
        key=lambda p: [int(x) for x in Path(p).parent.name.split(".") if x.isdigit()],
    )
    for directory in reversed(candidates):
        if (Path(directory) / "initdb").exists() and (Path(directory) / "pg_ctl").exists():
            return Path(directory)
    initdb = shutil.which("initdb")
    if initdb and shutil.which("pg_ctl"):
        return Path(initdb).parent
    raise PgUnavailable(
        "initdb/pg_ctl not found in /usr/lib/postgresql/*/bin or on PATH: install the "
        "PostgreSQL server package (e.g. apt-get install postgresql) to run this test"
    )


def reap_orphans() -> list[Path]:
    """Stop and delete the clusters this module left behind when the process that created them
    died without its finaliser (SIGKILLed pytest): only ``tether-pg-*`` directories in the temp
    directory whose owner pid is gone. Returns the directories removed."""
    removed = []
    for root in Path(tempfile.gettempdir()).glob(f"{PREFIX}*"):
        try:
            owner = int((root / OWNER_FILE).read_text())
        except (OSError, ValueError):
            continue
        try:
            os.kill(owner, 0)
            continue  # its owner is alive: not ours to touch
        except ProcessLookupError:
            pass
        except PermissionError:
            continue
        cluster = PgCluster.__new__(PgCluster)
        cluster.root, cluster.data, cluster.log = root, root / "data", root / "server.log"
        cluster.bin = find_pg_bin()
        cluster._as_postgres = os.geteuid() == 0
        cluster.running = True
        cluster.destroy()
        removed.append(root)
    return removed


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PgCluster:
    """One private PostgreSQL server. ``url`` is the SQLAlchemy URL of its ``postgres`` database
    (user ``postgres``, trust authentication)."""

    def __init__(self, *, port: int | None = None, bin_dir: Path | None = None) -> None:
        self.bin = bin_dir or find_pg_bin()
        self.port = port or free_port()
        self.root = Path(tempfile.mkdtemp(prefix=PREFIX))
        (self.root / OWNER_FILE).write_text(str(os.getpid()))
        self.data = self.root / "data"
        self.log = self.root / "server.log"
        self._as_postgres = os.geteuid() == 0
        self.running = False
        if self._as_postgres:
            try:
                pw = pwd.getpwnam("postgres")
            except KeyError:
                shutil.rmtree(self.root, ignore_errors=True)
                raise PgUnavailable(
                    "running as root, but there is no 'postgres' user to run initdb as"
                ) from None
            os.chown(self.root, pw.pw_uid, pw.pw_gid)
        os.chmod(self.root, 0o700)

    # -- commands -------------------------------------------------------------------------------

    def _run(self, *args: str, timeout: float = 120.0, check: bool = True) -> str:
        cmd = [str(self.bin / args[0]), *args[1:]]
        if self._as_postgres:
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        out = subprocess.run(
            cmd,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=self.root,
        )
        if check and out.returncode != 0:
            raise PgUnavailable(
                f"{' '.join(args[:2])} failed ({out.returncode}):\n{out.stdout}\n{out.stderr}"
                f"\n{self.log_tail()}"
            )
        return out.stdout

    @property
    def url(self) -> str:
        return f"postgresql+asyncpg://postgres@127.0.0.1:{self.port}/postgres"

    @property
    def dsn(self) -> str:
        """The same database for asyncpg/libpq."""
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def init(self) -> PgCluster:
        self._run(
            "initdb",
            "-D",
            str(self.data),
            "-A",
            "trust",
            "-U",
            "postgres",
            "-E",
            "UTF8",
            "--no-instructions",
        )
        return self

    def start(self, timeout: float = 60.0) -> None:
        opts = (
            f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=on "
            "-c max_connections=300 -c shared_buffers=64MB"
        )
        self._run(
            "pg_ctl",
            "-D",
            str(self.data),
            "-o",
            opts,
            "-l",
            str(self.log),
            "-w",
            "-t",
            str(int(timeout)),
            "start",
            timeout=timeout + 10,
        )
        self.running = True
        self.wait_ready(timeout)

    def stop(self, mode: str = "fast", timeout: float = 60.0) -> None:
        """``pg_ctl stop -m mode``: ``fast`` (clean) or ``immediate`` (a crash: recovery on the
        next start)."""
        self._run(
            "pg_ctl",
            "-D",
            str(self.data),
            "-m",
            mode,
            "-w",
            "-t",
            str(int(timeout)),
            "stop",
            timeout=timeout + 10,
            check=False,
        )
        self.running = False

    def wait_ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            with (
                contextlib.suppress(OSError),
                socket.create_connection(("127.0.0.1", self.port), timeout=1),
            ):
                out = subprocess.run(
                    [str(self.bin / "pg_isready"), "-h", "127.0.0.1", "-p", str(self.port)],
                    capture_output=True,
                    timeout=10,
                )
                if out.returncode == 0:
                    return
            if time.monotonic() > deadline:
                raise PgUnavailable(f"PostgreSQL on port {self.port} not ready\n{self.log_tail()}")
            time.sleep(0.1)

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log.read_text(errors="replace").splitlines()[-lines:]
        except OSError:
            return "(no server log)"
        return f"--- {self.log} ---\n" + "\n".join(text)

    def destroy(self) -> None:
        """Stop the server (immediately) and delete the cluster. Idempotent."""
        if self.data.exists() and (self.data / "postmaster.pid").exists():
            with contextlib.suppress(Exception):
                self.stop("immediate", timeout=30)
        self.running = False
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> PgCluster:
        try:
            self.init()
            self.start()
        except BaseException:
            self.destroy()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.destroy()
