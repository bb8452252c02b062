"""Hashing and atomic, checksum-verified downloads.

A download is written to a hidden temporary file next to its destination, hashed while it
streams, and renamed into place only when complete and correct, so an interrupted or corrupted
transfer never leaves a file that a later run would mistake for good data.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import http.client
import os
import tempfile
import urllib.error
import urllib.request
from pathlib import Path
from typing import BinaryIO

from tqdm import tqdm

from kalm.data.errors import DataError

_CHUNK = 1 << 20
_TIMEOUT_S = 60.0


def sha256_file(path: Path, *, decompress: bool = False) -> str:
    """Hex sha256 of a file's bytes (of its gunzipped content with `decompress=True`)."""
    digest = hashlib.sha256()
    opener = gzip.open if decompress else open
    with opener(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def download(url: str, dest: Path, expected: set[str]) -> None:
    """Fetch `url` into `dest` if its sha256 is in `expected`; raise `DataError` otherwise.

    `dest` appears only after a complete, verified transfer (atomic rename); any failure
    removes the temporary file.
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out:
            got = _stream(url, out, dest.name)
            out.flush()
            os.fsync(out.fileno())
        if got not in expected:
            raise DataError(
                f"checksum mismatch for {dest.name} downloaded from {url}: expected sha256 "
                f"{' or '.join(sorted(expected))}, got {got}. Nothing was saved; the source or "
                "mirror (KALM_DATA_URL) serves different bytes; fix or change it and retry."
            )
        tmp.chmod(0o644)  # mkstemp makes the file private; data files are not secret
        os.replace(tmp, dest)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def _stream(url: str, out: BinaryIO, label: str) -> str:
    """Copy the response body of `url` to `out` with a progress bar; return its sha256."""
    digest = hashlib.sha256()
    try:
        with urllib.request.urlopen(url, timeout=_TIMEOUT_S) as resp:
            length = resp.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else None
            received = 0
            with tqdm(total=total, unit="B", unit_scale=True, desc=f"download {label}") as bar:
                while chunk := resp.read(_CHUNK):
                    out.write(chunk)
                    digest.update(chunk)
                    received += len(chunk)
                    bar.update(len(chunk))
    except (OSError, http.client.HTTPException) as err:
        raise DataError(f"download of {url} failed: {_describe(err)}. Nothing was saved.") from err
    if total is not None and received != total:
        raise DataError(
            f"download of {url} was interrupted: got {received:,} of {total:,} bytes. "
            "Nothing was saved; retry."
        )
    return digest.hexdigest()


def _describe(err: BaseException) -> str:
    if isinstance(err, http.client.IncompleteRead):
        return f"connection closed early (interrupted transfer, {len(err.partial):,} bytes read)"
    if isinstance(err, urllib.error.HTTPError):
        return f"HTTP {err.code} {err.reason}"
    return str(err) or type(err).__name__
