"""Download, verification and atomicity of dataset files, against a loopback HTTP server."""

from __future__ import annotations

import gzip
import hashlib
import http.server
import os
import threading
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import pytest

from kalm.data import DataError, load_kg
from kalm.data.download import download
from kalm.data.files import dataset_files
from kalm.data.registry import DataFile, DatasetSpec

PAYLOAD = b"a\tb\tc\r\n" * 1000


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class _Handler(http.server.SimpleHTTPRequestHandler):
    """Serves a directory; `/short/...` promises more bytes than it sends, then hangs up."""

    def do_GET(self) -> None:
        if self.path.startswith("/short/"):
            self.send_response(200)
            self.send_header("Content-Length", str(len(PAYLOAD)))
            self.end_headers()
            self.wfile.write(PAYLOAD[:100])
            self.wfile.flush()
            self.close_connection = True
            return
        super().do_GET()

    def log_message(self, *args: object) -> None:
        """Keep test output clean."""


@pytest.fixture
def server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[str, Path]]:
    """(base URL, served directory) of an HTTP server on 127.0.0.1, with proxies bypassed."""
    root = tmp_path / "mirror"
    root.mkdir()
    for var in ("http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("no_proxy", "127.0.0.1")
    httpd = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), partial(_Handler, directory=str(root))
    )
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", root
    httpd.shutdown()
    httpd.server_close()
    thread.join()


def _spec(content: bytes = PAYLOAD, gz: bytes | None = None) -> DatasetSpec:
    gzip_sha = _sha(gz) if gz is not None else None
    files = {"train": DataFile("t.tsv", "unused", _sha(content), gzip_sha)}
    return DatasetSpec("toy", "Toy", files)


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def test_download_is_verified_and_atomic(server: tuple[str, Path], tmp_path: Path) -> None:
    url, root = server
    (root / "t.tsv").write_bytes(PAYLOAD)
    dest = tmp_path / "cache" / "t.tsv"
    download(f"{url}/t.tsv", dest, {_sha(PAYLOAD)})
    assert dest.read_bytes() == PAYLOAD
    assert _leftovers(dest.parent) == ["t.tsv"]


def test_corrupted_download_leaves_nothing(server: tuple[str, Path], tmp_path: Path) -> None:
    url, root = server
    (root / "t.tsv").write_bytes(PAYLOAD[:-1] + b"X")
    dest = tmp_path / "cache" / "t.tsv"
    with pytest.raises(DataError, match="checksum mismatch") as err:
        download(f"{url}/t.tsv", dest, {_sha(PAYLOAD)})
    assert _sha(PAYLOAD) in str(err.value) and _sha(PAYLOAD[:-1] + b"X") in str(err.value)
    assert _leftovers(dest.parent) == []


def test_interrupted_download_leaves_nothing(server: tuple[str, Path], tmp_path: Path) -> None:
    url, _ = server
    dest = tmp_path / "cache" / "t.tsv"
    with pytest.raises(DataError, match="interrupted"):
        download(f"{url}/short/t.tsv", dest, {_sha(PAYLOAD)})
    assert _leftovers(dest.parent) == []


def test_missing_remote_file_explains_fix(
    server: tuple[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    url, _ = server
    monkeypatch.setenv("KALM_DATA_URL", url)
    with pytest.raises(DataError) as err:
        dataset_files(_spec(), tmp_path / "data", tmp_path / "cache")
    message = str(err.value)
    assert "HTTP 404" in message and "KALM_DATA_DIR" in message and "t.tsv" in message
    assert str(tmp_path / "data" / "toy" / "t.tsv") in message
    assert _leftovers(tmp_path / "cache" / "toy") == []


def test_gzip_copy_accepted_by_content_and_stamped(tmp_path: Path) -> None:
    """A `.gz` copy counts if its bytes or its content match; the result is remembered."""
    folder = tmp_path / "data" / "toy"
    folder.mkdir(parents=True)
    reference = gzip.compress(PAYLOAD, compresslevel=9, mtime=0)
    (folder / "t.tsv.gz").write_bytes(gzip.compress(PAYLOAD, compresslevel=1, mtime=0))
    spec = _spec(gz=reference)
    cache = tmp_path / "cache"
    assert dataset_files(spec, tmp_path / "data", cache) == {"train": folder / "t.tsv.gz"}
    assert str(folder / "t.tsv.gz") in (cache / ".verified.json").read_text()
    (folder / "t.tsv.gz").write_bytes(gzip.compress(PAYLOAD + b"x", mtime=0))
    with pytest.raises(DataError, match=r"checksum mismatch.*t\.tsv\.gz"):
        dataset_files(spec, tmp_path / "data", cache)


def test_stamp_skips_rehashing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "data" / "toy"
    folder.mkdir(parents=True)
    (folder / "t.tsv").write_bytes(PAYLOAD)
    dataset_files(_spec(), tmp_path / "data", tmp_path / "cache")

    def fail(*_: object, **__: object) -> str:
        raise AssertionError("file hashed again despite an up-to-date stamp")

    monkeypatch.setattr("kalm.data.files.sha256_file", fail)
    dataset_files(_spec(), tmp_path / "data", tmp_path / "cache")
    os.utime(folder / "t.tsv", ns=(0, 0))
    with pytest.raises(AssertionError, match="hashed again"):
        dataset_files(_spec(), tmp_path / "data", tmp_path / "cache")


def test_load_wn18rr_from_mirror(
    server: tuple[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """End to end: an empty cache is filled from a KALM_DATA_URL mirror, then loaded."""
    shared = os.environ.get("KALM_DATA_DIR")
    if not shared:
        pytest.skip("KALM_DATA_DIR is not set")
    url, root = server
    (root / "wn18rr").symlink_to(Path(shared).resolve() / "wn18rr")
    monkeypatch.delenv("KALM_DATA_DIR")
    monkeypatch.setenv("KALM_DATA_URL", url)
    monkeypatch.setenv("KALM_CACHE_DIR", str(tmp_path / "cache"))
    kg = load_kg("wn18rr")
    assert (kg.num_entities, len(kg.train)) == (40_943, 86_835)
    cached = tmp_path / "cache" / "data" / "wn18rr"
    assert _leftovers(cached) == sorted(
        [
            "dev.tsv",
            "entities.txt",
            "relation2text.txt",
            "relations.txt",
            "test.tsv",
            "train.tsv",
            "wordnet-mlj12-definitions.txt",
        ]
    )


def test_same_size_edit_with_restored_mtime_is_caught(tmp_path: Path) -> None:
    """Size and mtime can be restored by hand; the stamp's ctime and inode cannot."""
    folder = tmp_path / "data" / "toy"
    folder.mkdir(parents=True)
    path = folder / "t.tsv"
    path.write_bytes(PAYLOAD)
    dataset_files(_spec(), tmp_path / "data", tmp_path / "cache")
    before = path.stat()
    with path.open("r+b") as f:  # same size, same inode, other bytes
        f.write(b"X")
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert (path.stat().st_size, path.stat().st_mtime_ns) == (before.st_size, before.st_mtime_ns)
    with pytest.raises(DataError, match=r"checksum mismatch for .*t\.tsv"):
        dataset_files(_spec(), tmp_path / "data", tmp_path / "cache")
    assert _leftovers(tmp_path / "cache") == [".verified.json"]
