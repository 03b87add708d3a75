"""Tests for checksummed downloads, against a real HTTP server on localhost."""

import dataclasses
import functools
import hashlib
import re
import shutil
import socket
import threading
from collections.abc import Iterator
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest

from medtransfer.data import medmnist_info
from medtransfer.data.download import download_url, fetch_medmnist, md5sum
from medtransfer.errors import DataError

WRONG_MD5 = "0123456789abcdef0123456789abcdef"
TRUNCATED_PATH = "/truncated.bin"


class _Handler(SimpleHTTPRequestHandler):
    """Serves a directory, records every request path, and can send a truncated body on purpose."""

    def do_GET(self) -> None:
        self.server.request_log.append(self.path)
        if self.path == TRUNCATED_PATH:
            self.send_response(200)
            self.send_header("Content-Length", "1000")
            self.end_headers()
            self.wfile.write(b"x" * 10)
            self.wfile.flush()
            self.close_connection = True
            return
        super().do_GET()

    def log_message(self, format: str, *args: object) -> None:
        pass


@dataclasses.dataclass
class Server:
    root: Path
    base_url: str
    requests: list[str]
    npz: Path
    npz_md5: str

    def url(self, name: str) -> str:
        return f"{self.base_url}/{name}"


@pytest.fixture
def server(tmp_path: Path, pneumonia_npz: Path) -> Iterator[Server]:
    root = tmp_path / "served"
    root.mkdir()
    npz = root / "pneumoniamnist.npz"
    shutil.copyfile(pneumonia_npz, npz)
    npz_md5 = hashlib.md5(npz.read_bytes()).hexdigest()

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Handler, directory=str(root)))
    httpd.request_log = []
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        host, port = httpd.server_address[:2]
        yield Server(root, f"http://{host}:{port}", httpd.request_log, npz, npz_md5)
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)


def _files_in(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir()) if directory.exists() else []


def test_md5sum_matches_hashlib(server: Server):
    assert md5sum(server.npz) == server.npz_md5
    assert md5sum(str(server.npz), chunk_size=1000) == server.npz_md5


def test_md5sum_of_missing_file_raises_data_error(tmp_path: Path):
    with pytest.raises(DataError, match=r"nothere\.npz"):
        md5sum(tmp_path / "nothere.npz")


def test_download_with_correct_md5_is_byte_identical(server: Server, tmp_path: Path):
    target = tmp_path / "out" / "nested" / "copy.npz"
    result = download_url(server.url("pneumoniamnist.npz"), target, server.npz_md5, progress=False)
    assert result == target
    assert target.read_bytes() == server.npz.read_bytes()
    assert _files_in(target.parent) == ["copy.npz"]
    assert target.stat().st_mode & 0o777 == 0o644
    assert server.requests == ["/pneumoniamnist.npz"]


def test_download_accepts_str_path_uppercase_md5_and_progress_bar(server: Server, tmp_path: Path):
    target = tmp_path / "copy.npz"
    url = server.url("pneumoniamnist.npz")
    result = download_url(url, str(target), server.npz_md5.upper(), progress=True)
    assert result == target
    assert md5sum(target) == server.npz_md5


def test_wrong_md5_raises_and_leaves_nothing_behind(server: Server, tmp_path: Path):
    out = tmp_path / "out"
    target = out / "copy.npz"
    url = server.url("pneumoniamnist.npz")
    with pytest.raises(DataError) as excinfo:
        download_url(url, target, WRONG_MD5, progress=False)
    message = str(excinfo.value)
    assert WRONG_MD5 in message
    assert server.npz_md5 in message
    assert url in message
    assert str(target) in message
    assert "\n" not in message
    assert not target.exists()
    assert _files_in(out) == []
    assert server.requests == ["/pneumoniamnist.npz"]


def test_404_raises_data_error_naming_the_url(server: Server, tmp_path: Path):
    target = tmp_path / "missing.npz"
    url = server.url("does-not-exist.npz")
    with pytest.raises(DataError) as excinfo:
        download_url(url, target, WRONG_MD5, progress=False)
    message = str(excinfo.value)
    assert url in message
    assert "404" in message
    assert str(target) in message
    assert _files_in(tmp_path) == ["served"]


def test_truncated_transfer_raises_and_leaves_nothing_behind(server: Server, tmp_path: Path):
    out = tmp_path / "out"
    url = server.url(TRUNCATED_PATH.lstrip("/"))
    with pytest.raises(DataError, match=r"truncated\.bin") as excinfo:
        download_url(url, out / "t.bin", WRONG_MD5, progress=False)
    assert "\n" not in str(excinfo.value)
    assert _files_in(out) == []


def test_connection_refused_raises_data_error(tmp_path: Path):
    with socket.socket() as sock:  # find a free port, then close it so nothing listens there
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url = f"http://127.0.0.1:{port}/pneumoniamnist.npz"
    with pytest.raises(DataError, match=re.escape(url)):
        download_url(url, tmp_path / "x.npz", WRONG_MD5, progress=False, timeout=5)
    assert _files_in(tmp_path) == []


def test_unsupported_url_raises_data_error(tmp_path: Path):
    with pytest.raises(DataError, match="not-a-url"):
        download_url("not-a-url", tmp_path / "x.npz", WRONG_MD5, progress=False)
    assert _files_in(tmp_path) == []


def test_existing_correct_file_is_not_downloaded_again(server: Server, tmp_path: Path):
    target = tmp_path / "copy.npz"
    shutil.copyfile(server.npz, target)
    mtime = target.stat().st_mtime_ns
    result = download_url(server.url("pneumoniamnist.npz"), target, server.npz_md5, progress=False)
    assert result == target
    assert server.requests == []
    assert target.stat().st_mtime_ns == mtime


def test_existing_corrupt_file_is_replaced(server: Server, tmp_path: Path):
    target = tmp_path / "copy.npz"
    target.write_bytes(b"not the right content")
    download_url(server.url("pneumoniamnist.npz"), target, server.npz_md5, progress=False)
    assert server.requests == ["/pneumoniamnist.npz"]
    assert target.read_bytes() == server.npz.read_bytes()
    assert _files_in(tmp_path) == ["copy.npz", "served"]


def test_fetch_medmnist_end_to_end(server: Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    # Point the registry entry at the local server; the shared copy has its own md5 (not the official one).
    info = medmnist_info.get_medmnist_info("pneumoniamnist")
    local = dataclasses.replace(info, resources={28: (server.url("pneumoniamnist.npz"), server.npz_md5)})
    monkeypatch.setitem(medmnist_info._REGISTRY, "pneumoniamnist", local)

    root = tmp_path / "medmnist"
    path = fetch_medmnist("pneumoniamnist", 28, root, progress=False)
    assert path == root / "pneumoniamnist.npz"
    assert path.read_bytes() == server.npz.read_bytes()
    with np.load(path) as data:
        assert {"train_images", "train_labels", "test_images", "test_labels"} <= set(data.files)
        assert data["train_images"].shape[1:] == (28, 28)

    # Second call finds the verified file and makes no request.
    assert fetch_medmnist("pneumoniamnist", 28, str(root), progress=False) == path
    assert server.requests == ["/pneumoniamnist.npz"]


@pytest.mark.parametrize("size", [28, 64])
def test_fetch_medmnist_base_url_checks_the_official_md5(server: Server, tmp_path: Path, size: int):
    info = medmnist_info.get_medmnist_info("pneumoniamnist")
    official_md5 = info.resource(size)[1]
    if server.npz_md5 == official_md5:
        pytest.skip("the shared file is the official release; this test needs a file that differs")
    filename = info.filename(size)
    if filename != server.npz.name:
        shutil.copyfile(server.npz, server.root / filename)

    root = tmp_path / "medmnist"
    with pytest.raises(DataError) as excinfo:
        fetch_medmnist("pneumoniamnist", size, root, base_url=server.base_url + "/", progress=False)
    message = str(excinfo.value)
    assert official_md5 in message
    assert server.npz_md5 in message
    assert server.requests == [f"/{filename}"]
    assert _files_in(root) == []


def test_fetch_medmnist_rejects_unknown_size_and_flag_before_downloading(server: Server, tmp_path: Path):
    root = tmp_path / "medmnist"
    with pytest.raises(DataError, match="available sizes: 28, 64, 128, 224"):
        fetch_medmnist("pneumoniamnist", 32, root, base_url=server.base_url, progress=False)
    with pytest.raises(DataError, match="known flags"):
        fetch_medmnist("nosuchmnist", 28, root, base_url=server.base_url, progress=False)
    assert server.requests == []
    assert not root.exists()


def test_datamodule_downloads_a_missing_file_before_setup(
    server: Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    from medtransfer.data.medmnist import MedMNISTDataModule

    info = medmnist_info.get_medmnist_info("pneumoniamnist")
    local = dataclasses.replace(info, resources={28: (server.url("pneumoniamnist.npz"), server.npz_md5)})
    monkeypatch.setitem(medmnist_info._REGISTRY, "pneumoniamnist", local)
    root = tmp_path / "cache"
    dm = MedMNISTDataModule(root=str(root), image_size=28, mean=(0.5,) * 3, std=(0.5,) * 3)
    assert not dm.file.exists()
    dm.prepare_data()
    dm.setup("fit")
    assert dm.file == root / "pneumoniamnist.npz" and server.requests == ["/pneumoniamnist.npz"]
    assert len(dm.datasets["test"]) == 624
