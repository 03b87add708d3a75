"""``medtransfer serve``: a real server process on 127.0.0.1 over a tiny fitted checkpoint, called over real HTTP,
answering as ``medtransfer predict`` does on the same files, refusing bad requests with a 4xx that names the problem
and still serving, and draining on SIGTERM."""

from __future__ import annotations

import base64
import csv
import io
import os
import random
import signal
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import psutil
import pytest
import requests
from helpers import fit_in, tiny_fit_args
from PIL import Image
from servers import serve_process

from medtransfer.entry import main

REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / "configs" / "pneumonia_effnet_lite0.yaml"
TOKEN = "test-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
#: The module server's body limit, in MB (--max_body_mb).
LIMIT_MB = 0.5

pytestmark = pytest.mark.slow  # a CLI fit and real server processes


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, pneumonia_npz) -> Path:
    """A tiny real fit of the default config (32 px, a few batches): decision rule, calibration, reference stats."""
    workdir = tmp_path_factory.mktemp("fit")
    cli = fit_in(workdir, ["fit", f"--config={CONFIG}", f"--data.path={pneumonia_npz}", *tiny_fit_args()])
    return (workdir / cli.trainer.checkpoint_callback.best_model_path).resolve()


def _dicom(frames: np.ndarray, pixels: bool = True) -> bytes:
    """A DICOM file of ``(F, H, W)`` uint8 frames stored as 12-bit values; ``pixels=False``: no pixel data."""
    import pydicom
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset("x.dcm", {}, file_meta=meta, preamble=b"\0" * 128)
    ds.Rows, ds.Columns = frames.shape[1:]
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    if len(frames) > 1:
        ds.NumberOfFrames = len(frames)
    if pixels:
        ds.PixelData = (frames.astype(np.uint16) * 16).tobytes()
    stream = io.BytesIO()
    pydicom.dcmwrite(stream, ds, enforce_file_format=True)
    return stream.getvalue()


def _encoded(image: np.ndarray, fmt: str) -> bytes:
    stream = io.BytesIO()
    Image.fromarray(image).save(stream, format=fmt)
    return stream.getvalue()


@pytest.fixture(scope="module")
def images(tmp_path_factory, pneumonia_npz) -> Path:
    """Real X-rays as PNG, 16-bit PNG, JPEG, TIFF, DICOM and a 3-frame DICOM, in one folder."""
    folder = tmp_path_factory.mktemp("images")
    with np.load(pneumonia_npz) as data:
        xrays = data["test_images"][:16]
    for i, xray in enumerate(xrays[:10]):
        (folder / f"case{i:02d}.png").write_bytes(_encoded(xray, "PNG"))
    (folder / "deep.png").write_bytes(_encoded(xrays[10].astype(np.uint16) * 200 + 300, "PNG"))
    (folder / "photo.jpg").write_bytes(_encoded(xrays[11], "JPEG"))
    (folder / "scan.tif").write_bytes(_encoded(xrays[12], "TIFF"))
    (folder / "study.dcm").write_bytes(_dicom(xrays[13][None]))
    (folder / "cine.dcm").write_bytes(_dicom(xrays[13:16]))
    return folder


@pytest.fixture(scope="module")
def predicted(checkpoint, images, tmp_path_factory) -> dict[str, dict[str, str]]:
    """``medtransfer predict``'s rows for the same files, by file name."""
    output = tmp_path_factory.mktemp("predict") / "predictions.csv"
    main(["predict", str(images), str(checkpoint), "--output", str(output)])
    with output.open(newline="") as handle:
        return {Path(row["path"]).name: row for row in csv.DictReader(handle)}


@pytest.fixture(scope="module")
def server(checkpoint, tmp_path_factory):
    """The server under test: batches of up to 8, a bearer token, a body limit of ``LIMIT_MB``."""
    args = [str(checkpoint), "--max_batch_size", "8", "--batch_timeout", "0.01", "--max_body_mb", str(LIMIT_MB)]
    with serve_process(*args, cwd=tmp_path_factory.mktemp("serve"), env={"MEDTRANSFER_SERVE_TOKEN": TOKEN}) as (
        url,
        process,
    ):
        yield url, process


def _post(url: str, body: bytes, content_type: str | None = "application/octet-stream", **kwargs):
    headers = {**AUTH, **({"Content-Type": content_type} if content_type else {}), **kwargs.pop("headers", {})}
    return requests.post(f"{url}/predict", data=body, headers=headers, timeout=120, **kwargs)


def _same_as_predict(answer: dict, row: dict[str, str]) -> None:
    """Every field of predict's row, probabilities to 1e-5 (the path is the server's label, not a file)."""
    assert set(answer) == set(row)
    for key, value in row.items():
        if key.startswith("prob_"):
            assert float(answer[key]) == pytest.approx(float(value), abs=1e-5), key
        elif key != "path":
            assert str(answer[key]) == value, key


def test_serve_answers_as_predict_does_for_every_format_and_way_of_sending(server, images, predicted):
    url, _ = server
    assert len(predicted) == 15 and all(row["error"] == "" for row in predicted.values())
    for i, path in enumerate(sorted(images.iterdir())):
        data = path.read_bytes()
        way = i % 3
        if way == 0:  # the file as the body
            answer = _post(url, data)
        elif way == 1:  # a multipart upload (curl -F file=@...)
            answer = requests.post(f"{url}/predict", files={"file": (path.name, data)}, headers=AUTH, timeout=120)
        else:  # JSON with base64
            answer = requests.post(f"{url}/predict", json={"image": base64.b64encode(data).decode(), "filename":
                                   path.name}, headers=AUTH, timeout=120)  # fmt: skip
        assert answer.status_code == 200, answer.text
        _same_as_predict(answer.json(), predicted[path.name])
        assert answer.json()["path"] == ("" if way == 0 else path.name)


def test_heatmap_is_a_png_at_the_image_size_with_predicts_peak(server, images, checkpoint, tmp_path):
    url, _ = server
    path = images / "case03.png"
    output = tmp_path / "one.csv"
    single = tmp_path / "one"
    single.mkdir()
    (single / path.name).write_bytes(path.read_bytes())
    main(["predict", str(single), str(checkpoint), "--output", str(output), "--heatmaps", str(tmp_path / "maps")])
    with output.open(newline="") as handle:
        (row,) = list(csv.DictReader(handle))
    answer = _post(url, path.read_bytes(), params={"heatmap": "true"})
    assert answer.status_code == 200, answer.text
    values = answer.json()
    picture = Image.open(io.BytesIO(base64.b64decode(values["heatmap_png"])))
    assert picture.format == "PNG" and picture.size == Image.open(path).size
    for key in ("peak_x", "peak_y", "peak_value", "box_x_min", "box_y_min", "box_x_max", "box_y_max"):
        assert values[key] == row[key], key
    assert "heatmap_png" not in _post(url, path.read_bytes()).json()


def test_health_is_open_and_info_names_the_model_and_its_input(server, checkpoint, predicted):
    url, _ = server
    assert requests.get(f"{url}/health", timeout=30).status_code == 200
    assert requests.get(f"{url}/info", timeout=30).status_code == 401
    info = requests.get(f"{url}/info", headers=AUTH, timeout=30).json()["model"]
    assert info["name"] == str(checkpoint)
    assert info["input"]["size"] == 32 and info["task"] == "binary"
    assert info["fields"] == list(next(iter(predicted.values())))  # predict's CSV header
    assert info["max_body_bytes"] == int(LIMIT_MB * 1e6)


def test_a_missing_or_wrong_bearer_token_gets_401(server, images):
    url, _ = server
    data = (images / "case00.png").read_bytes()
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}):
        answer = requests.post(f"{url}/predict", data=data, headers=headers, timeout=30)
        assert answer.status_code == 401
        assert "bearer token" in answer.json()["detail"]


def _truncated_png(images: Path) -> bytes:
    data = (images / "case01.png").read_bytes()
    return data[: len(data) // 2]


#: Bad requests: (name, body, content type, expected status, words the answer must hold).
BAD = [
    ("not an image", b"just some text, no pixels", "application/octet-stream", 422, "unknown image format"),
    ("empty body", b"", "image/png", 400, "empty request body"),
    ("wrong content type", b"\x89PNG\r\n\x1a\n", "text/plain", 415, "'text/plain' is not accepted"),
    ("form content type", b"a=b", "application/x-www-form-urlencoded", 415, "is not accepted"),
    ("broken JSON", b'{"image": ', "application/json", 400, "not valid JSON"),
    ("JSON path", b'{"path": "/etc/passwd"}', "application/json", 400, "'path'"),
    ("JSON not base64", b'{"image": "%%%"}', "application/json", 400, "not valid base64"),
    ("body over the limit", b"\0" * int(LIMIT_MB * 1e6 + 1), "application/dicom", 413, "over the limit"),
]


def _bad_requests(images: Path) -> list[tuple[str, bytes, str, int, str]]:
    pixel_less = _dicom(np.zeros((1, 8, 8), np.uint8), pixels=False)
    dicom = (images / "study.dcm").read_bytes()
    return [
        *BAD,
        ("truncated PNG", _truncated_png(images), "image/png", 422, "cannot decode as PNG"),
        ("pixel-less DICOM", pixel_less, "application/dicom", 422, "no pixel data"),
        ("truncated DICOM", dicom[: len(dicom) - 100], "application/dicom", 422, "cannot decode as DICOM"),
    ]


def test_bad_requests_get_a_4xx_naming_the_problem_and_the_server_keeps_serving(server, images, predicted):
    url, _ = server
    for name, body, kind, status, words in _bad_requests(images):
        answer = _post(url, body, kind)
        assert answer.status_code == status, (name, answer.text)
        assert words in answer.json()["detail"], name
        good = _post(url, (images / "case02.png").read_bytes())
        assert good.status_code == 200, name
        _same_as_predict(good.json(), predicted["case02.png"])


def test_no_request_makes_the_server_read_a_path_on_its_disk(server, images, predicted):
    url, _ = server
    on_disk = str(images / "case04.png")  # a readable image on the server's disk
    as_text = base64.b64encode(on_disk.encode()).decode()
    answer = requests.post(f"{url}/predict", json={"image": as_text}, headers=AUTH, timeout=60)
    assert answer.status_code == 422 and "unknown image format" in answer.json()["detail"]
    sent = base64.b64encode((images / "case05.png").read_bytes()).decode()
    named = requests.post(f"{url}/predict", json={"image": sent, "filename": on_disk}, headers=AUTH, timeout=60)
    _same_as_predict(named.json(), predicted["case05.png"])  # the bytes sent, not the file named
    upload = requests.post(
        f"{url}/predict", files={"file": (on_disk, base64.b64decode(sent))}, headers=AUTH, timeout=60
    )
    _same_as_predict(upload.json(), predicted["case05.png"])


def _workers(process: subprocess.Popen) -> set[int]:
    return {child.pid for child in psutil.Process(process.pid).children(recursive=True)}


def test_a_thousand_requests_from_16_clients_with_one_in_ten_bad(server, images, predicted):
    url, process = server
    before = _workers(process)
    good = [(path.name, path.read_bytes()) for path in sorted(images.iterdir())]
    bad = _bad_requests(images)
    rng = random.Random(0)
    plan = [("bad", bad[i % len(bad)]) if i % 10 == 0 else ("good", rng.choice(good)) for i in range(1000)]
    rng.shuffle(plan)
    local = threading.local()

    def send(item):
        kind, request = item
        session = getattr(local, "session", None) or requests.Session()
        local.session = session
        if kind == "good":
            return kind, request, session.post(f"{url}/predict", data=request[1], headers=AUTH, timeout=120)
        _, body, content_type, _, _ = request
        headers = {**AUTH, "Content-Type": content_type}
        return kind, request, session.post(f"{url}/predict", data=body, headers=headers, timeout=120)

    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(send, plan))
    for kind, request, answer in answers:
        if kind == "good":
            assert answer.status_code == 200, answer.text
            _same_as_predict(answer.json(), predicted[request[0]])
        else:
            assert answer.status_code == request[3], (request[0], answer.text)
            assert request[4] in answer.json()["detail"]
    assert sum(kind == "bad" for kind, _, _ in answers) == 100
    assert requests.get(f"{url}/health", timeout=30).status_code == 200
    assert _workers(process) == before  # no worker lost or replaced


def test_sigterm_finishes_the_requests_in_flight_and_exits_0(checkpoint, images, tmp_path):
    data = (images / "case06.png").read_bytes()
    # batches wait up to 3 s to fill: the requests are still in flight when SIGTERM comes
    args = [str(checkpoint), "--max_batch_size", "64", "--batch_timeout", "3"]
    with serve_process(*args, cwd=tmp_path) as (url, process):
        port = int(url.rsplit(":", 1)[1])
        with ThreadPoolExecutor(8) as pool:
            futures = [pool.submit(_post, url, data) for _ in range(8)]
            _wait_for_connections(process, port, 8)
            os.kill(process.pid, signal.SIGTERM)
            answers = [future.result() for future in futures]
        assert process.wait(timeout=120) == 0
    assert [answer.status_code for answer in answers] == [200] * 8
    assert len({tuple(answer.json().values()) for answer in answers}) == 1  # one image, one answer


def _wait_for_connections(process: subprocess.Popen, port: int, count: int) -> None:
    """Poll until the server's HTTP processes hold ``count`` open connections on ``port`` (bounded by the test
    timeout)."""
    while True:
        held = 0
        for child in psutil.Process(process.pid).children(recursive=True):
            try:
                held += sum(c.status == "ESTABLISHED" and c.laddr.port == port for c in child.net_connections("tcp"))
            except psutil.Error:
                continue
        if held >= count:
            return
        time.sleep(0.05)
