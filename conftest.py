"""Test-wide defaults: the smoke profile, a scratch directory for the pages' results and the
read-only data directory beside the repository."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent

os.environ.setdefault("KALM_PROFILE", "smoke")
# Smoke runs of the notebooks must not overwrite the book's results (book/results/).
os.environ.setdefault("KALM_RESULTS_DIR", tempfile.mkdtemp(prefix="kalm-results-"))
_shared = ROOT.parent / "shared" / "data"
if "KALM_DATA_DIR" not in os.environ and _shared.is_dir():
    os.environ["KALM_DATA_DIR"] = str(_shared)


@pytest.fixture(scope="session")
def tokenizer():
    """The real SmolLM2 tokenizer (pad == EOS), shared by the tests that need real token ids."""
    from kalm.models import load_tokenizer

    return load_tokenizer("smollm2")


@pytest.fixture(scope="session")
def kg():
    """WN18RR from KALM_DATA_DIR."""
    from kalm.data import load_kg

    return load_kg("wn18rr")
