"""The CI entry point runs the README's `make test`, reports its total time and keeps its status."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

from kalm.config import REPO_ROOT


@pytest.mark.parametrize("status", [0, 3])
def test_ci_runs_make_test_and_reports_its_time_and_status(tmp_path: Path, status: int) -> None:
    make = tmp_path / "make"  # stands in for make: records its arguments, exits with `status`
    make.write_text(f'#!/usr/bin/env bash\necho "$@" > {tmp_path / "args"}\nexit {status}\n')
    make.chmod(0o755)
    env = {**os.environ, "PATH": f"{tmp_path}{os.pathsep}{os.environ['PATH']}"}
    proc = subprocess.run(
        [str(REPO_ROOT / ".ci" / "run")], env=env, capture_output=True, text=True, check=False
    )
    assert proc.returncode == status
    assert (tmp_path / "args").read_text() == "test\n"
    last = proc.stdout.splitlines()[-1]
    assert re.fullmatch(rf"ci: make test exited with {status} after \d+ min \d+ s", last), last
