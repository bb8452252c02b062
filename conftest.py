"""Test-wide defaults: the smoke profile and the read-only data directory beside the repository."""

from __future__ import annotations

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parent

os.environ.setdefault("KALM_PROFILE", "smoke")
_shared = ROOT.parent / "shared" / "data"
if "KALM_DATA_DIR" not in os.environ and _shared.is_dir():
    os.environ["KALM_DATA_DIR"] = str(_shared)
