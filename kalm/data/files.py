"""Find a dataset's files on disk, verify them, and download what is missing.

Search order for `<dataset>/<file>`: the `data_dir` argument, else `$KALM_DATA_DIR`; then the
user cache `$KALM_CACHE_DIR/data` (default `~/.cache/kalm/data`). Missing files are downloaded
into the cache from the public source, or from `$KALM_DATA_URL` (a mirror laid out like the
reference data directory). Verified hashes are remembered in a stamp file inside the cache,
keyed by path, size, mtime, ctime and inode, so a read-only data directory is hashed only once
while any rewrite of a file (even one that keeps its size and restores its mtime) is hashed
again.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

from kalm.data.download import download, sha256_file
from kalm.data.errors import DataError
from kalm.data.registry import DataFile, DatasetSpec
from kalm.durable import atomic_write_json

_STAMP_NAME = ".verified.json"


def user_cache() -> Path:
    """The user cache of the whole library: ``KALM_CACHE_DIR``, else ``~/.cache/kalm``."""
    base = os.environ.get("KALM_CACHE_DIR") or Path.home() / ".cache" / "kalm"
    return Path(base).expanduser()


def cache_root() -> Path:
    """Directory holding downloaded datasets and the verification stamps."""
    return user_cache() / "data"


def data_root(data_dir: str | Path | None) -> Path | None:
    """The user-provided data directory: the argument, else `$KALM_DATA_DIR`, else None."""
    chosen = data_dir if data_dir is not None else os.environ.get("KALM_DATA_DIR") or None
    return Path(chosen).expanduser().resolve() if chosen is not None else None


def dataset_files(
    spec: DatasetSpec, root: Path | None, cache: Path, *, allow_download: bool = True
) -> dict[str, Path]:
    """Paths of every file of `spec` by role, each verified against its registered sha256."""
    search = [d / spec.name for d in (root, cache) if d is not None]
    stamps = _Stamps(cache / _STAMP_NAME)
    paths = {
        role: _locate(spec, f, search, cache / spec.name, stamps, allow_download)
        for role, f in spec.files.items()
    }
    stamps.save()
    return paths


def _locate(
    spec: DatasetSpec,
    f: DataFile,
    search: list[Path],
    target: Path,
    stamps: _Stamps,
    allow_download: bool,
) -> Path:
    names = [f.name, f.stored_name] if f.gzip_sha256 else [f.name]
    for folder in search:
        for name in names:
            path = folder / name
            if path.is_file():
                _verify(path, f, stamps)
                return path
    tried = ", ".join(str(d / n) for d in search for n in names)
    if not (allow_download and spec.downloadable):
        why = "downloading is off" if spec.downloadable else "it has no single-file download source"
        raise DataError(
            f"{spec.title} file {f.name} not found (looked for {tried}) and {why}. "
            f"Set KALM_DATA_DIR to a directory holding {spec.name}/{f.stored_name}."
        )
    mirror = os.environ.get("KALM_DATA_URL")
    if mirror:  # laid out like the reference directory, so possibly the `.gz` form
        url, dest = f"{mirror.rstrip('/')}/{spec.name}/{f.stored_name}", target / f.stored_name
        expected = {f.sha256, f.gzip_sha256 or f.sha256}
    else:
        url, dest, expected = f.url, target / f.name, {f.sha256}
    try:
        download(url, dest, expected)
    except DataError as err:
        raise DataError(
            f"{spec.title} file {f.name} not found (looked for {tried}) and could not be "
            f"downloaded: {err} Set KALM_DATA_DIR to a directory holding "
            f"{spec.name}/{f.stored_name}, or KALM_DATA_URL to a mirror of that layout."
        ) from err
    stamps.record(dest, sha256_file(dest))
    return dest


def _verify(path: Path, f: DataFile, stamps: _Stamps) -> None:
    """Check `path` against the registered hash (raw bytes, or gunzipped content for `.gz`)."""
    gz = path.name.endswith(".gz") and path.name != f.name
    accepted = {f.sha256, f.gzip_sha256 or f.sha256} if gz else {f.sha256}
    if stamps.known(path) in accepted:
        return
    got = sha256_file(path)
    if gz and got not in accepted:
        got = sha256_file(path, decompress=True)
    if got not in accepted:
        want = " or ".join(sorted(accepted))
        raise DataError(
            f"checksum mismatch for {path}: expected sha256 {want}, got {got}. The file is "
            "corrupted or a different version; delete it so it is downloaded again, or replace "
            f"it with a fresh copy from {f.url}"
        )
    stamps.record(path, got)


class _Stamps:
    """Remembered verifications: path -> (identity, sha256), stored as JSON in the cache.

    The identity is size, mtime, ctime and inode. Size and mtime alone can be faked (an edit
    that keeps the size, then ``touch -d`` to restore the mtime); ctime cannot be set by a
    user and changes with every write or ``utime``, and a replaced file has a new inode.
    """

    def __init__(self, file: Path) -> None:
        self.file = file
        self.changed = False
        try:
            entries = json.loads(file.read_text())
        except (OSError, ValueError):
            entries = {}
        # A damaged stamp file only costs re-hashing.
        self.entries: dict[str, list] = entries if isinstance(entries, dict) else {}

    @staticmethod
    def _identity(path: Path) -> list[int]:
        st = path.stat()
        return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]

    def known(self, path: Path) -> str | None:
        """The stored sha256 of `path` if it has not changed since it was verified."""
        entry = self.entries.get(str(path))
        if isinstance(entry, list) and entry[:-1] == self._identity(path):
            return entry[-1]
        return None

    def record(self, path: Path, sha256: str) -> None:
        self.entries[str(path)] = [*self._identity(path), sha256]
        self.changed = True

    def save(self) -> None:
        """Write the stamps atomically; a read-only cache only costs re-hashing next time."""
        if not self.changed:
            return
        with contextlib.suppress(OSError):
            atomic_write_json(self.file, self.entries)
