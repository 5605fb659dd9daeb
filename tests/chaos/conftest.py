"""Fixtures for the process-level chaos tests: ``procs`` starts real ``tether`` processes and
reaps them all when the test ends, however it ends."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "support"))

from procs import ProcessGroup


@pytest.fixture
def procs(tmp_path: Path) -> Iterator[ProcessGroup]:
    group = ProcessGroup(tmp_path / "procs")
    try:
        yield group
    finally:
        group.cleanup()
        print(f"process logs: {group.log_dir}")
