"""Hashing and atomic, checksum-verified downloads.

A download is written through `kalm.durable.atomic_writer` (a temporary file next to its
destination), hashed while it streams, and renamed into place only when complete and correct, so
an interrupted or corrupted transfer never leaves a file that a later run would mistake for good
data.
"""

from __future__ import annotations

import hashlib
import http.client
import urllib.error
import urllib.request
from pathlib import Path
from typing import BinaryIO

from tqdm import tqdm

from kalm.data.errors import DataError
from kalm.durable import atomic_writer, sha256_file

__all__ = ["download", "sha256_file"]  # sha256_file re-exported for the data readers

_CHUNK = 1 << 20
_TIMEOUT_S = 60.0


def download(url: str, dest: Path, expected: set[str]) -> None:
    """Fetch `url` into `dest` if its sha256 is in `expected`; raise `DataError` otherwise.

    `dest` appears only after a complete, verified transfer (atomic rename); any failure
    removes the temporary file.
    """
    with atomic_writer(dest, "wb") as out:
        got = _stream(url, out, dest.name)
        if got not in expected:
            raise DataError(
                f"checksum mismatch for {dest.name} downloaded from {url}: expected sha256 "
                f"{' or '.join(sorted(expected))}, got {got}. Nothing was saved; the source or "
                "mirror (KALM_DATA_URL) serves different bytes; fix or change it and retry."
            )


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
