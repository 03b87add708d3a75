"""``medtransfer serve``: the model behind an HTTP endpoint (LitServe), one study per request, answered with the
fields of a ``predict`` CSV row.

A request carries the image itself, never a path: the raw body (``image/*``, ``application/dicom``,
``application/octet-stream``), a multipart upload, or JSON ``{"image": "<base64>"}``. :class:`RequestGate`, in the
HTTP processes, checks the bearer token, the size and the content type, and hands LitServe one JSON shape;
:class:`ImageAPI`, in the inference workers, decodes, batches and predicts with ``predict``'s own reader,
transform, network, decision rule and out-of-distribution screen. A bad image answers 422 alone: the other
requests of its batch are predicted.

Annotations here are evaluated (no ``from __future__ import annotations``): LitServe and FastAPI read them.
"""

import base64
import binascii
import hmac
import io
import json
import logging
import multiprocessing
import os
import signal
from dataclasses import dataclass
from typing import Any, Literal
from urllib.parse import parse_qs

import litserve as ls
import numpy as np
import torch
from fastapi.responses import JSONResponse, Response
from PIL import Image
from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from medtransfer import __version__
from medtransfer.commands import predict_writer as writing
from medtransfer.commands.predict import Precision, resolve_device
from medtransfer.commands.predictor import (
    PredictModule,
    Predictor,
    explainable_network,
    load_predictor,
    read_as_trained,
)
from medtransfer.data.transforms import build_eval_transform
from medtransfer.data.unlike import unlike_reasons
from medtransfer.errors import DataError
from medtransfer.explain import DEFAULT_METHOD, explain, map_box, map_peak, overlay
from medtransfer.explain.methods import Method

__all__ = ["ACCEPTED_TYPES", "HEATMAP_FIELDS", "ImageAPI", "RequestGate", "ServeSummary", "run_serve"]

_logger = logging.getLogger(__name__)

#: Content types a raw request body may have; the format itself is detected from the bytes.
ACCEPTED_TYPES = ("image/png", "image/jpeg", "image/tiff", "image/bmp", "application/dicom",
                  "application/octet-stream")  # fmt: skip
#: Fields a response gains with ``?heatmap=true``: the overlay as base64 PNG, its peak and the box of its hot
#: region (multi-label: one per finding decided positive, ``|``-joined, named in ``heatmap_finding``).
HEATMAP_FIELDS = ("heatmap_png", "peak_x", "peak_y", "peak_value", "box_x_min", "box_y_min", "box_x_max", "box_y_max")
_JSON_KEYS = {"image", "filename", "heatmap"}
_PREDICT_PATH = "/predict"
_OPEN_PATHS = ("/health",)  # a load balancer's probe needs no token
_TRUE, _FALSE = ("true", "1", "yes"), ("false", "0", "no")
_PRECISION = {"bf16": torch.bfloat16, "16": torch.float16}


class _Refusal(Exception):
    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status, self.detail = status, detail


class RequestGate:
    """ASGI middleware before LitServe: the bearer token (every path but ``/health``), the body limit, and, on
    ``POST /predict``, the content type; the body becomes ``{"image": base64, "filename", "heatmap"}``. Every
    refusal is a JSON ``{"detail": ...}`` naming the problem."""

    def __init__(self, app: ASGIApp, *, max_body_bytes: int, token: str | None = None) -> None:
        self.app, self.max_body_bytes, self.token = app, max_body_bytes, token

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {key.decode("latin-1").lower(): value.decode("latin-1") for key, value in scope["headers"]}
        try:
            self._check_token(scope["path"], headers)
            if scope["path"] != _PREDICT_PATH or scope["method"] != "POST":
                await self.app(scope, receive, send)
                return
            body = await self._read_body(headers, receive)
            payload = await self._payload(scope, headers, body)
        except _Refusal as refusal:
            extra = {"WWW-Authenticate": "Bearer"} if refusal.status == 401 else None
            await JSONResponse({"detail": refusal.detail}, refusal.status, headers=extra)(scope, receive, send)
            return
        content = json.dumps(payload).encode()
        kept = [(k, v) for k, v in scope["headers"] if k.lower() not in (b"content-type", b"content-length")]
        kept += [(b"content-type", b"application/json"), (b"content-length", str(len(content)).encode())]
        sent = False

        async def replay() -> Message:
            nonlocal sent
            if sent:
                return await receive()  # the disconnect, when it comes
            sent = True
            return {"type": "http.request", "body": content, "more_body": False}

        await self.app({**scope, "headers": kept}, replay, send)

    def _check_token(self, path: str, headers: dict[str, str]) -> None:
        if self.token is None or path in _OPEN_PATHS:
            return
        scheme, _, given = headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), self.token.encode()):
            raise _Refusal(401, "missing or wrong bearer token: send the header 'Authorization: Bearer <token>'")

    async def _read_body(self, headers: dict[str, str], receive: Receive) -> bytes:
        too_large = _Refusal(413, f"request body over the limit of {self.max_body_bytes} bytes (--max_body_mb)")
        declared = headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_body_bytes:
            raise too_large  # refused before reading it
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise _Refusal(400, "the client went away before sending the whole body")
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                raise too_large
            chunks.append(chunk)
            more = message.get("more_body", False)
        return b"".join(chunks)

    async def _payload(self, scope: Scope, headers: dict[str, str], body: bytes) -> dict[str, Any]:
        """``{"image", "filename", "heatmap"}`` from any accepted request, or the refusal naming what is wrong."""
        heatmap = _flag(parse_qs(scope.get("query_string", b"").decode("latin-1")).get("heatmap", [None])[-1])
        if not body:
            raise _Refusal(400, "empty request body: send the image file as the body, as a multipart upload or as "
                                'JSON {"image": "<base64>"}')  # fmt: skip
        kind = headers.get("content-type", "").split(";")[0].strip().lower()
        if kind == "application/json":
            payload = _json_payload(body)
            payload["heatmap"] = payload["heatmap"] or heatmap
            return payload
        if kind == "multipart/form-data":
            data, name = await _multipart_file(scope, body)
        elif kind in ACCEPTED_TYPES or not kind:  # no content type: the bytes speak for themselves
            data, name = body, ""
        else:
            accepted = ", ".join(ACCEPTED_TYPES)
            raise _Refusal(415, f"content type {kind or '(none)'!r} is not accepted: send an image as {accepted}, "
                                "a multipart/form-data upload or application/json")  # fmt: skip
        return {"image": base64.b64encode(data).decode("ascii"), "filename": name, "heatmap": heatmap}


def _flag(value: str | None, key: str = "heatmap") -> bool:
    if value is None or value.lower() in _FALSE:
        return False
    if value.lower() in _TRUE:
        return True
    raise _Refusal(400, f"{key}={value!r}: expected true or false")


def _json_payload(body: bytes) -> dict[str, Any]:
    try:
        values = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise _Refusal(400, f"body is not valid JSON ({err})") from None
    if not isinstance(values, dict):
        raise _Refusal(400, f'JSON body must be an object {{"image": "<base64>"}}, got {type(values).__name__}')
    unknown = sorted(set(values) - _JSON_KEYS)
    if unknown:
        raise _Refusal(400, f"unknown JSON key(s) {', '.join(map(repr, unknown))}: send the image itself, base64 "
                            f"in 'image' (optional: 'filename', 'heatmap'); the server reads no paths")  # fmt: skip
    image, name, heatmap = values.get("image"), values.get("filename", ""), values.get("heatmap", False)
    if not isinstance(image, str) or not image:
        raise _Refusal(400, "JSON key 'image' must hold the image file as a non-empty base64 string")
    try:
        data = base64.b64decode(image, validate=True)
    except (binascii.Error, ValueError) as err:
        raise _Refusal(400, f"JSON key 'image' is not valid base64 ({err})") from None
    if not data:
        raise _Refusal(400, "JSON key 'image' decodes to 0 bytes")
    if not isinstance(name, str) or not isinstance(heatmap, bool):
        raise _Refusal(400, "JSON key 'filename' must be a string and 'heatmap' true or false")
    return {"image": image, "filename": name, "heatmap": heatmap}


async def _multipart_file(scope: Scope, body: bytes) -> tuple[bytes, str]:
    """The one file of a multipart upload and its file name (a label only: never opened)."""

    async def once() -> Message:
        return {"type": "http.request", "body": body, "more_body": False}

    try:
        form = await Request(scope, once).form(max_files=1, max_fields=10)
    except Exception as err:  # python-multipart's and Starlette's parse errors: the request's fault
        reason = " ".join(str(err).split()) or type(err).__name__
        raise _Refusal(400, f"multipart body cannot be parsed ({reason})") from None
    try:
        files = [value for _, value in form.multi_items() if hasattr(value, "read")]
        if len(files) != 1:
            raise _Refusal(400, f"multipart upload must hold exactly one file, got {len(files)}")
        return await files[0].read(), files[0].filename or ""
    finally:
        await form.close()


@dataclass
class ServeSummary:
    """What a finished ``serve`` served: the model's name and its endpoint."""

    model: str
    url: str


@dataclass
class _Decoded:
    """One request as the worker decoded it: the model's input (or the error), the image for overlays."""

    name: str
    heatmap: bool
    tensor: torch.Tensor | None = None
    image: np.ndarray | None = None
    error: str = ""


class ImageAPI(ls.LitAPI):
    """``predict``'s model as a LitServe API: each worker loads it in :meth:`setup`; ``predict`` takes a batch of
    decoded requests, unreadable ones included, and returns one row (or error) per request."""

    def __init__(
        self, model: str, tracking_uri: str | None = None, precision: Precision = "32", frame: str | None = None,
        explain_method: Method = DEFAULT_METHOD, threads: int | None = None, max_batch_size: int = 8,
        batch_timeout: float = 0.005,
    ) -> None:  # fmt: skip
        super().__init__(max_batch_size=max_batch_size, batch_timeout=batch_timeout)
        self.model, self.tracking_uri, self.precision, self.frame = model, tracking_uri, precision, frame
        self.explain_method, self.threads = explain_method, threads

    def setup(self, device: str) -> None:
        if self.threads:
            torch.set_num_threads(self.threads)
        self.predictor = load_predictor(self.model, device, self.tracking_uri)
        settings = self.predictor.settings
        self.module = PredictModule(self.predictor.network)
        self.transform = build_eval_transform(settings.size, settings.channels, settings.mean, settings.std,
                                              settings.interpolation, color=settings.color)  # fmt: skip
        self.read_frame = self.frame or settings.dicom_frame
        self.columns = writing.csv_columns(self.predictor, per_frame=False, heatmaps=False)
        self.explainer: torch.nn.Module | None = None
        self.noted: set[str] = set()
        self.device_type = torch.device(device).type

    def decode_request(self, request: dict[str, Any]) -> _Decoded:
        """Never raises: a bad image is carried as its error, so the rest of its batch is still predicted."""
        item = _Decoded(name=str(request.get("filename") or ""), heatmap=bool(request.get("heatmap")))
        try:
            image = read_as_trained(base64.b64decode(request["image"]), self.predictor.settings.color,
                                    self.read_frame, self.noted)  # fmt: skip
            item.tensor = self.transform(image=image)["image"]
            item.image = image if item.heatmap else None
        except (DataError, OSError, ValueError) as err:
            item.error = " ".join(str(err).split())
        return item

    def batch(self, inputs: list[_Decoded]) -> list[_Decoded]:
        return inputs

    def predict(self, x: _Decoded | list[_Decoded]) -> dict[str, Any] | list[dict[str, Any]]:
        items = x if isinstance(x, list) else [x]  # a list when batching (max_batch_size > 1)
        good = [item for item in items if item.tensor is not None]
        rows: dict[int, dict[str, Any]] = {}
        if good:
            images = torch.stack([item.tensor for item in good])
            with torch.inference_mode(), torch.autocast(self.device_type, _PRECISION.get(self.precision),
                                                         enabled=self.precision != "32"):  # fmt: skip
                probs = self.module.predict_step(([], images.to(self.predictor_device), []), 0).cpu()
            reasons = unlike_reasons(images, self.predictor.settings.reference)
            for item, row, reason in zip(good, writing.prediction_rows(self.predictor, probs), reasons, strict=True):
                row.update(path=item.name, unlike_training=reason, error="", model=self.predictor.label)
                rows[id(item)] = {column: row.get(column, "") for column in self.columns}
            wanted = [j for j, item in enumerate(good) if item.heatmap]
            if wanted:
                self._add_heatmaps([good[j] for j in wanted], images[wanted], probs[wanted], rows)
        out = [rows.get(id(item), {"error": item.error}) for item in items]
        return out if isinstance(x, list) else out[0]

    @property
    def predictor_device(self) -> torch.device:
        return next(iter([*self.predictor.network.parameters(), *self.predictor.network.buffers()])).device

    def _add_heatmaps(self, items: list[_Decoded], images: torch.Tensor, probs: torch.Tensor,
                      rows: dict[int, dict[str, Any]]) -> None:  # fmt: skip
        """``HEATMAP_FIELDS`` for the requests that asked, as ``predict --heatmaps`` computes them."""
        try:
            if self.explainer is None:
                self.explainer = explainable_network(self.predictor, self.model, str(self.predictor_device),
                                                     self.tracking_uri)  # fmt: skip
        except DataError as err:
            for item in items:
                rows[id(item)] = {"error": " ".join(str(err).split())}
            return
        targets = writing.heatmap_targets(self.predictor, probs)
        pairs = [(j, t) for j, labels in enumerate(targets) for t in labels]
        device = self.predictor_device
        target = None if pairs[0][1] is None else torch.tensor([t for _, t in pairs], device=device)
        chosen = images[[j for j, _ in pairs]].to(device).float()
        maps = explain(self.explainer, chosen, target, self.explain_method).cpu()
        fields: dict[int, dict[str, list[str]]] = {j: {} for j in range(len(items))}
        for (j, label), heat in zip(pairs, maps, strict=True):
            full = writing.full_size_map(heat, items[j].image.shape[:2])
            picture = io.BytesIO()
            Image.fromarray(overlay(items[j].image, full)).save(picture, format="PNG")
            x, y, value = map_peak(full)
            box = map_box(full, writing.BOX_THRESHOLD) or ("",) * 4
            values = [base64.b64encode(picture.getvalue()).decode("ascii"), f"{x:.1f}", f"{y:.1f}", f"{value:.4f}",
                      *map(str, box)]  # fmt: skip
            if label is not None:
                values.append(self.predictor.class_names[label])
            for name, text in zip((*HEATMAP_FIELDS, "heatmap_finding"), values, strict=False):
                fields[j].setdefault(name, []).append(text)
        for j, item in enumerate(items):
            rows[id(item)].update({name: "|".join(texts) for name, texts in fields[j].items()})

    def unbatch(self, output: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return output

    def encode_response(self, output: dict[str, Any]) -> Response:
        if "decision" not in output:  # an image that could not be read: the request's fault
            return JSONResponse({"detail": output["error"]}, status_code=422)
        return JSONResponse(output)


def model_info(predictor: Predictor, max_body_bytes: int, frame: str | None) -> dict[str, Any]:
    """What ``GET /info`` says of the model: name, version, input spec, decision rule and the response fields."""
    label = predictor.label
    version = label.rsplit("/", 1)[-1] if label.startswith("models:/") else None
    return {
        "name": label, "version": version, "medtransfer_version": __version__, "task": predictor.task,
        "class_names": predictor.class_names, "input": predictor.settings.to_dict(),
        "dicom_frame": frame or predictor.settings.dicom_frame, "decision": predictor.rule.to_dict(),
        "fields": writing.csv_columns(predictor, False, False), "heatmap_fields": list(HEATMAP_FIELDS),
        "accepts": [*ACCEPTED_TYPES, "multipart/form-data", "application/json"], "max_body_bytes": max_body_bytes,
    }  # fmt: skip


def run_serve(
    model: str,
    host: Literal["127.0.0.1", "0.0.0.0", "::"] = "127.0.0.1",
    port: int = 8000,
    max_batch_size: int = 16,
    batch_timeout: float = 0.005,
    workers: int = 1,
    device: Literal["auto", "cpu", "cuda"] = "auto",
    precision: Precision = "32",
    frame: Literal["first", "middle", "error"] | None = None,
    explain_method: Method = DEFAULT_METHOD,
    max_body_mb: float = 20.0,
    token_variable: str = "MEDTRANSFER_SERVE_TOKEN",
    tracking_uri: str | None = None,
    log_level: Literal["debug", "info", "warning", "error"] = "info",
) -> ServeSummary:
    """Serve the model over HTTP: ``POST /predict`` an image, get ``predict``'s row as JSON, until SIGTERM or
    Ctrl-C.

    Args:
        model: a ``medtransfer fit`` checkpoint or an MLflow model URI (``runs:/<id>/model``,
            ``models:/<name>@<alias>``).
        host: the address to bind: ``127.0.0.1`` (this machine only), or ``0.0.0.0``/``::`` behind a reverse proxy.
        port: the TCP port.
        max_batch_size: requests predicted together (dynamic batching); 1 turns batching off.
        batch_timeout: seconds a batch waits to fill before it is predicted.
        workers: inference worker processes, each with its own copy of the model.
        device: ``auto`` uses a GPU when there is one.
        precision: ``32``, or autocast to ``bf16`` (GPU or CPU) / ``16`` (GPU) for speed.
        frame: multi-frame DICOM: ``first``, ``middle`` or ``error``; default: the model's.
        explain_method: the heatmap method of ``?heatmap=true`` (as ``predict --explain_method``).
        max_body_mb: the largest request body accepted (MB); larger ones get 413.
        token_variable: the environment variable holding a bearer token; when it is set, requests without
            ``Authorization: Bearer <token>`` get 401 (``/health`` excepted).
        tracking_uri: MLflow store of ``runs:/`` and ``models:/`` URIs (default ``$MLFLOW_TRACKING_URI``, else mlruns).
        log_level: the HTTP servers' log level (``info`` logs each request).
    """
    if workers < 1 or max_batch_size < 1 or batch_timeout < 0 or max_body_mb <= 0:
        raise DataError(
            "Expected --workers and --max_batch_size of at least 1, --batch_timeout of at least 0 and --max_body_mb "
            f"above 0, but got {workers}, {max_batch_size}, {batch_timeout}, {max_body_mb}"
        )
    device = resolve_device(device, precision)
    predictor = load_predictor(model, "cpu", tracking_uri)  # fails here, in one line, before any worker starts
    max_body_bytes = int(max_body_mb * 1e6)
    info = model_info(predictor, max_body_bytes, frame)
    del predictor
    threads = max(1, (os.cpu_count() or 1) // workers) if device == "cpu" else None
    api = ImageAPI(model, tracking_uri, precision, frame, explain_method, threads, max_batch_size, batch_timeout)
    token = os.environ.get(token_variable) or None
    server = ls.LitServer(
        api, accelerator=device, devices=1, workers_per_device=workers, model_metadata=info, fast_queue=True,
        middlewares=[(RequestGate, {"max_body_bytes": max_body_bytes, "token": token})],
    )  # fmt: skip
    _logger.info("Serving %s on http://%s:%d%s%s", info["name"], host, port, _PREDICT_PATH,
                 f" (bearer token from ${token_variable})" if token else "")  # fmt: skip
    signal.signal(signal.SIGTERM, _drain)
    server.run(host=host, port=port, log_level=log_level, generate_client_file=False)
    return ServeSummary(model=info["name"], url=f"http://{host}:{port}{_PREDICT_PATH}")


def _drain(signum: int, frame: Any) -> None:
    """SIGTERM: the HTTP processes stop accepting and finish their in-flight requests (the inference workers
    still run), then LitServe's own shutdown, as on Ctrl-C, stops the workers and ``run`` returns: exit 0."""
    http = [p for p in multiprocessing.active_children() if p.name.startswith("LitServer-")]
    for process in http:
        process.terminate()
    for process in http:
        process.join(timeout=60)
    raise KeyboardInterrupt  # LitServe's shutdown path; a SIGINT could be ignored (a background job's)
