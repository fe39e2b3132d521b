"""`cifar4 serve`: a trained model behind a web page and a JSON API (FastAPI + uvicorn).

    GET  /                  the page: choose a model, drop images or try a test image
    GET  /api/health        {"status": "ok", ...}: the process answers (never needs the token)
    GET  /api/ready         200 once every offered model is loaded, 503 before (never needs the token)
    GET  /api/runs          the runs offered, best validation accuracy first
    GET  /api/runs/NAME/curves.png, /api/runs/NAME/confusion.png   the model card's figures
    GET  /api/test-image    a random image of a run's test split, with its true class
    POST /api/predict       multipart: `files` (one or more images), optional `run`, optional
                            `attention=true` (each image's attention map as an RGBA PNG overlay)
    GET  /metrics           Prometheus text format: requests, latency, images, batches, load times
    GET  /docs              FastAPI's OpenAPI page
    GET  /report/           the lab report, with --lab-dir

With a token (`--token`, or CIFAR4_TOKEN; required when listening beyond the loopback), every
request needs `Authorization: Bearer TOKEN` (or HTTP Basic with the token as password, which a
browser asks for at /report/) except what holds no run's data: the page and its static files,
/api/health and /api/ready (for load balancers), /docs and the OpenAPI schema. The check runs
before anything else, uploads included, and is deny-by-default: a route added later is guarded
without a line of its own. The page asks for the token once and keeps it for the tab.

Every model is loaded when the server starts (in the background: /api/ready says when), and gets
one worker thread: requests queue their uploads there, and the worker decodes them and runs
everything waiting (up to MAX_BATCH images) in forward passes of exactly FORWARD_IMAGES images,
so that an upload's answer does not depend on which other requests were waiting. One thread
doing all decoding and inference keeps memory flat under many clients (one allocator arena, no
per-thread copies) and uses the cores through torch's own threads; nothing process-wide changes
per request. Bad requests get a 4xx status and {"error": "one line"}; an unexpected failure is a
500 with a one-line error, never a traceback. On SIGTERM (or Ctrl-C) the server stops accepting
connections, finishes the requests in flight and exits 0.
"""

# No `from __future__ import annotations` here: FastAPI reads the endpoints' annotations at run
# time, and the fastapi types they name are imported inside the functions (an optional extra).
import asyncio
import base64
import binascii
import contextlib
import hmac
import io
import ipaddress
import os
import queue
import random
import signal
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import data as datamod
from .. import record
from ..data.images import MAX_PIXELS, decode_image
from ..data.split import split_indices
from ..device import pick_device
from ..errors import Cifar4Error, ConfigError, ImageError, MissingExtraError, RunError
from ..runs import LoadedModel, load_model, read_metrics
from .predict import predict_arrays

MAX_BYTES = 10 * 1024 * 1024  # per uploaded file
MAX_FILES = 32                # per request
MAX_BATCH = 256               # images the worker takes from the waiting requests at once
FORWARD_IMAGES = 8            # images per forward pass, always (padded): answers independent of batching
SEARCH = (Path("runs"), Path("lab") / "runs", Path("lab-quick") / "runs")
TOKEN_ENV = "CIFAR4_TOKEN"
MIN_TOKEN = 8                 # characters: a token a class cannot guess in a lesson
# Reachable without the token: nothing here holds a run's data (the page fetches that through
# the API), and load balancers probe health and readiness without credentials.
OPEN_PATHS = frozenset({"/", "/api/health", "/api/ready", "/docs", "/docs/oauth2-redirect", "/redoc",
                        "/openapi.json", "/favicon.ico"})
OPEN_PREFIXES = ("/static/",)
GRACE_S = 30                  # seconds in-flight requests get to finish after SIGTERM


def _require_serve(metrics: bool = True) -> Any:
    try:
        import fastapi
        import python_multipart  # noqa: F401  (FastAPI's form parser)
        import uvicorn  # noqa: F401
        if metrics:
            import prometheus_client  # noqa: F401
    except ImportError:
        raise MissingExtraError("cifar4 serve needs the 'serve' extra (fastapi, uvicorn, python-multipart, "
                                "prometheus-client); run: pip install 'cifar4[serve]'") from None
    return fastapi


class RequestError(Exception):
    """A bad request: its HTTP status and one line."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


@dataclass
class _Job:
    uploads: list[tuple[str, bytes]]
    done: Future = field(default_factory=Future)


class Batcher:
    """One model's worker thread: takes every job waiting (up to MAX_BATCH images), decodes
    their uploads, runs one forward pass, and answers each job. A job whose upload cannot be
    decoded gets its RequestError; the others in the batch go on. `on_batch(images)` hears the
    size of every batch that reached the model (the metrics' batch-size histogram)."""

    def __init__(self, loaded: LoadedModel, tta: int, name: str, on_batch: Callable[[int], None] | None = None):
        self.loaded, self.tta, self.on_batch = loaded, tta, on_batch
        self.jobs: queue.SimpleQueue[_Job] = queue.SimpleQueue()
        self.thread = threading.Thread(target=self._work, name=f"cifar4-{name}", daemon=True)
        self.thread.start()

    def submit(self, uploads: list[tuple[str, bytes]]) -> Future:
        job = _Job(uploads)
        self.jobs.put(job)
        return job.done

    def _work(self) -> None:
        while True:
            batch = [self.jobs.get()]
            size = len(batch[0].uploads)
            while size < MAX_BATCH:
                try:
                    job = self.jobs.get_nowait()
                except queue.Empty:
                    break
                batch.append(job)
                size += len(job.uploads)
            self._run(batch)

    def _run(self, batch: list[_Job]) -> None:
        ready: list[tuple[_Job, list[np.ndarray]]] = []
        for job in batch:
            try:
                ready.append((job, [_decode_upload(n, b, self.loaded.input_size) for n, b in job.uploads]))
            except RequestError as e:
                job.done.set_exception(e)
        if not ready:
            return
        try:
            X = np.stack([x for _, xs in ready for x in xs])
            n = len(X)
            if self.on_batch is not None:
                self.on_batch(n)
            # Every forward pass takes exactly FORWARD_IMAGES images (the last padded with
            # blanks): oneDNN's kernels, and so the last digits of the probabilities, depend on
            # the batch size, and an upload's answer must not depend on who else was waiting.
            X = np.concatenate([X, np.zeros((-n % FORWARD_IMAGES, *X.shape[1:]), X.dtype)])
            with torch.inference_mode():
                probs = predict_arrays(self.loaded, X, self.tta, batch_size=FORWARD_IMAGES)[:n]
        except Exception as e:  # a bug: every job of the batch reports it, the worker lives on
            for job, _ in ready:
                job.done.set_exception(e)
            return
        start = 0
        for job, xs in ready:
            job.done.set_result((xs, probs[start:start + len(xs)]))
            start += len(xs)


@dataclass
class Served:
    """One finished run the server offers."""

    name: str
    folder: Path
    metrics: dict[str, Any]
    loaded: LoadedModel | None = None
    batcher: Batcher | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)
    explainer: LoadedModel | None = None  # its own copy for attention maps: Captum hooks never touch the worker's
    explain_lock: threading.Lock = field(default_factory=threading.Lock)

    def card(self) -> dict[str, Any]:
        m = self.metrics
        return {"name": self.name, "run": str(self.folder), "experiment": m.get("experiment"),
                "model": m.get("model"), "params": m.get("params"), "epochs": m.get("epochs"),
                "val_accuracy": m.get("val_accuracy"), "test_accuracy": m.get("test_accuracy"),
                "classes": list(m.get("per_class_accuracy", {})),
                "curves": f"/api/runs/{self.name}/curves.png", "confusion": f"/api/runs/{self.name}/confusion.png"}


def find_runs(runs: list[Path] | None = None, search: tuple[Path, ...] = SEARCH) -> list[tuple[str, Path]]:
    """The runs given, else every finished run under the search folders; (name, folder)."""
    if runs:
        folders = [Path(r) for r in runs]
        for f in folders:
            if not (f / "metrics.json").is_file() or not (f / "model.json").is_file():
                raise RunError(f"run '{f}' is not a finished run (no metrics.json or model.json); "
                               f"expected a run directory (see 'cifar4 runs')")
    else:
        folders = [d for root in search if root.is_dir() for d in sorted(root.iterdir())
                   if (d / "metrics.json").is_file() and (d / "model.json").is_file()]
    out: list[tuple[str, Path]] = []
    seen: set[str] = set()
    for f in folders:
        name = f.name if f.name not in seen else f"{f.parent.parent.name}-{f.name}"
        seen.add(name)
        out.append((name, f))
    return out


class ModelStore:
    """The offered runs, ranked by validation accuracy (never test: that is the held-out
    number), each model loaded once: all of them by `load_all` at start, or the first time one
    is asked for. `on_load(run, seconds)` and `on_batch(run, images)` feed the metrics."""

    def __init__(self, runs: list[tuple[str, Path]], data: str | Path | None = None,
                 device: torch.device | None = None, on_load: Callable[[str, float], None] | None = None,
                 on_batch: Callable[[str, int], None] | None = None):
        self.device = device or pick_device("auto")
        self.data_arg = data
        self.on_load, self.on_batch = on_load, on_batch
        self._data: datamod.Dataset | None = None
        self._lock = threading.Lock()
        self.load_errors: dict[str, str] = {}
        served = [Served(n, f, read_metrics(f)) for n, f in runs]
        self.runs = {s.name: s for s in sorted(served, key=lambda s: -float(s.metrics.get("val_accuracy", 0)))}

    @property
    def default(self) -> str | None:
        return next(iter(self.runs), None)

    @property
    def ready(self) -> bool:
        """Every offered model is loaded (a server with no run to offer is never ready)."""
        return bool(self.runs) and all(s.loaded is not None for s in self.runs.values())

    def load_all(self) -> None:
        """Load every offered model; a run that fails keeps its one-line error in load_errors."""
        for name in self.runs:
            try:
                self.get(name)
            except Exception as e:  # reported by /api/ready; requests for it get the error too
                self.load_errors[name] = str(e).splitlines()[0] if str(e) else type(e).__name__

    def get(self, name: str | None) -> Served:
        if not self.runs:
            raise RequestError(404, "no finished run to serve; train one with 'cifar4 train' first")
        key = name or self.default
        if key not in self.runs:
            raise RequestError(404, f"run '{name}' is unknown; expected one of {', '.join(self.runs)}")
        s = self.runs[str(key)]
        with s.lock:
            if s.loaded is None:
                t0 = time.perf_counter()
                loaded = load_model(s.folder, device=self.device)
                on_batch = self.on_batch
                s.batcher = Batcher(loaded, int(s.metrics.get("tta", 0)), s.name,
                                    None if on_batch is None else lambda n: on_batch(s.name, n))
                s.loaded = loaded
                if self.on_load is not None:
                    self.on_load(s.name, time.perf_counter() - t0)
        return s

    async def predict(self, name: str | None, uploads: list[tuple[str, bytes]]
                      ) -> tuple[Served, list[np.ndarray], np.ndarray]:
        """Decode and classify uploads on the model's worker, batched with other requests."""
        s = self.runs.get(str(name or self.default))
        if s is None or s.loaded is None:  # a model still loading must not stall the event loop
            s = await asyncio.to_thread(self.get, name)
        assert s.batcher is not None
        images, probs = await asyncio.wrap_future(s.batcher.submit(uploads))
        return s, images, probs

    def attention(self, s: Served, images: list[np.ndarray], classes: np.ndarray) -> tuple[str, list[np.ndarray]]:
        """(method, an RGBA overlay per image) of where the model looks for the class it
        answered (cifar4.interpret.attention_maps: Grad-CAM, saliency for an MLP)."""
        from ..interpret import attention_maps, heat_image
        with s.explain_lock:
            if s.explainer is None:
                s.explainer = load_model(s.folder, device=self.device)
            maps = attention_maps(s.explainer, torch.from_numpy(np.stack(images)), torch.from_numpy(classes))
        return maps.method, [heat_image(m) for m in maps.maps]

    def dataset(self) -> datamod.Dataset:
        with self._lock:
            if self._data is None:
                self._data = datamod.load(self.data_arg)
            return self._data

    def test_image(self, name: str | None, rng: random.Random) -> tuple[Served, np.ndarray, str]:
        s = self.get(name)
        exp = record.read_experiment(s.folder)
        try:
            ds = self.dataset()
        except Cifar4Error as e:
            raise RequestError(404, f"no dataset to draw a test image from ({e})") from None
        _, idx = split_indices(exp.data, ds)
        i = int(idx["test"][rng.randrange(len(idx["test"]))])
        return s, ds.X[i], ds.classes[int(ds.Y[i])]


def png_data_uri(x: np.ndarray) -> str:
    from PIL import Image
    buf = io.BytesIO()
    Image.fromarray(x).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _page_html() -> str:
    from jinja2 import Environment, PackageLoader, select_autoescape
    env = Environment(loader=PackageLoader("cifar4.serving", "templates"), autoescape=select_autoescape())
    return env.get_template("index.html").render(max_files=MAX_FILES, max_mb=MAX_BYTES // (1024 * 1024))


# ---------------------------------------------------------------- the token

def check_token(token: str | None) -> str | None:
    """The token as given, or a ConfigError naming what a usable token is."""
    if token is None:
        return None
    if len(token) < MIN_TOKEN or not token.isascii() or not token.isprintable() or " " in token:
        raise ConfigError(f"--token (or {TOKEN_ENV}) must be at least {MIN_TOKEN} printable ASCII characters "
                          f"without spaces; make one with: python -c 'import secrets; "
                          f"print(secrets.token_urlsafe(16))'")
    return token


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to any interface


def _presented(authorization: bytes) -> bytes | None:
    """The secret in an Authorization header: Bearer TOKEN, or Basic with the token as password."""
    scheme, _, value = authorization.strip().partition(b" ")
    if scheme.lower() == b"bearer":
        return value.strip()
    if scheme.lower() == b"basic":
        try:
            return base64.b64decode(value.strip(), validate=True).partition(b":")[2]
        except (binascii.Error, ValueError):
            return None
    return None


class TokenGuard:
    """ASGI middleware: a request for anything outside OPEN_PATHS without the token gets a 401
    and {"error": ...} before the app reads its body. The comparison takes constant time
    (hmac.compare_digest), and neither the token nor what was presented is ever echoed."""

    def __init__(self, app: Any, token: str):
        self.app, self.token = app, token.encode()

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        path = scope.get("path", "")
        if scope["type"] != "http" or path in OPEN_PATHS or path.startswith(OPEN_PREFIXES):
            return await self.app(scope, receive, send)
        header = dict(scope["headers"]).get(b"authorization")
        given = _presented(header) if header else None
        if given is not None and hmac.compare_digest(given, self.token):
            return await self.app(scope, receive, send)
        from starlette.responses import JSONResponse
        what = "is missing" if header is None else "is wrong"
        # a browser shows its own password prompt for the report's pages (Basic); the API says Bearer
        challenge = 'Basic realm="cifar4"' if path.startswith("/report") else 'Bearer realm="cifar4"'
        await JSONResponse({"error": f"the access token {what}; send the header 'Authorization: Bearer TOKEN' "
                                     f"(the token the server was started with)"}, status_code=401,
                           headers={"WWW-Authenticate": challenge})(scope, receive, send)


# ---------------------------------------------------------------- metrics

class ServerMetrics:
    """The Prometheus metrics of one app, in a registry of its own (two apps in one process,
    as in the tests, never count into each other), and the ASGI middleware that times requests."""

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
        self.registry = r = CollectorRegistry()
        self.requests = Counter("cifar4_http_requests", "HTTP requests answered, by route, method and status.",
                                ["route", "method", "status"], registry=r)
        self.latency = Histogram("cifar4_http_request_duration_seconds", "Time from request to the last byte "
                                 "of the answer, by route.", ["route"], registry=r)
        self.images = Counter("cifar4_images_classified", "Images classified, by run.", ["run"], registry=r)
        self.batch = Histogram("cifar4_batch_images", "Images per batch that reached the model, by run.",
                               ["run"], buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256), registry=r)
        self.load = Gauge("cifar4_model_load_seconds", "Seconds the run's model took to load.", ["run"], registry=r)
        self.ready = Gauge("cifar4_ready", "1 once every offered model is loaded, else 0.", registry=r)

    def hooks(self) -> tuple[Callable[[str, float], None], Callable[[str, int], None]]:
        """ModelStore's on_load and on_batch."""
        return (lambda run, s: self.load.labels(run).set(s)), (lambda run, n: self.batch.labels(run).observe(n))

    def render(self) -> tuple[bytes, str]:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
        return generate_latest(self.registry), CONTENT_TYPE_LATEST

    def middleware(self, app: Any) -> Any:
        metrics = self

        async def timed(scope: dict, receive: Any, send: Any) -> None:
            if scope["type"] != "http":
                return await app(scope, receive, send)
            t0, status = time.perf_counter(), [500]

            async def send_seen(message: dict) -> None:
                if message["type"] == "http.response.start":
                    status[0] = message["status"]
                await send(message)
            try:
                await app(scope, receive, send_seen)
            finally:
                route = _route_of(scope)
                metrics.requests.labels(route, scope["method"], str(status[0])).inc()
                metrics.latency.labels(route).observe(time.perf_counter() - t0)
        return timed


def _route_of(scope: dict) -> str:
    """The route template a request matched (/api/runs/{name}/{figure}, /static), so that the
    metrics' labels stay few whatever paths clients ask for; a request refused before routing
    (no token) or for no route is "unmatched"."""
    route = scope.get("route")  # set by the router on a match
    if getattr(route, "path", None):
        return str(route.path)  # type: ignore[union-attr]
    from starlette.routing import Mount
    mounts = [r.path for r in scope["app"].routes if isinstance(r, Mount)]  # /static, /report
    return next((m for m in mounts if scope.get("path", "").startswith(m + "/")), "unmatched")


# ---------------------------------------------------------------- routes

def _ops_router(store: ModelStore, page: str, metrics: ServerMetrics | None) -> Any:
    """The page, health, readiness and metrics."""
    from fastapi import APIRouter
    from fastapi.responses import HTMLResponse, JSONResponse, Response
    router = APIRouter()

    @router.get("/", response_class=HTMLResponse, include_in_schema=False)
    def index() -> str:
        return page

    @router.get("/api/health")
    def health() -> dict[str, Any]:
        return {"status": "ok", "runs": len(store.runs), "default": store.default,
                "loaded": [n for n, s in store.runs.items() if s.loaded is not None], "device": str(store.device)}

    @router.get("/api/ready", responses={503: {"description": "Models still loading, or one failed to load."}})
    def ready() -> JSONResponse:
        if store.ready:
            return JSONResponse({"status": "ready", "runs": len(store.runs)})
        if not store.runs:
            msg = "no finished run to serve; train one with 'cifar4 train' first"
        elif store.load_errors:
            msg = "; ".join(f"run '{n}' failed to load: {e}" for n, e in store.load_errors.items())
        else:
            msg = f"loading models ({sum(s.loaded is not None for s in store.runs.values())} of {len(store.runs)})"
        return JSONResponse({"status": "not ready", "error": msg}, status_code=503)

    if metrics is not None:
        @router.get("/metrics", include_in_schema=False)
        def prometheus() -> Response:
            metrics.ready.set(1 if store.ready else 0)
            body, kind = metrics.render()
            return Response(body, media_type=kind)
    return router


def _api_router(store: ModelStore, metrics: ServerMetrics | None, dependencies: list[Any]) -> Any:
    """The JSON API over the runs: their cards, figures, test images and predictions."""
    from fastapi import APIRouter, File, Form, UploadFile
    from fastapi.responses import FileResponse
    router, rng = APIRouter(prefix="/api", dependencies=dependencies), random.Random()

    @router.get("/runs")
    def list_runs() -> dict[str, Any]:
        return {"default": store.default, "runs": [s.card() for s in store.runs.values()]}

    @router.get("/runs/{name}/{figure}", include_in_schema=False)
    def run_figure(name: str, figure: str) -> FileResponse:
        if figure not in ("curves.png", "confusion.png"):
            raise RequestError(404, f"'{figure}' is not a run figure; expected curves.png or confusion.png")
        if name not in store.runs:
            raise RequestError(404, f"run '{name}' is unknown")
        path = store.runs[name].folder / figure
        if not path.is_file():
            raise RequestError(404, f"run '{name}' has no {figure}")
        return FileResponse(path, media_type="image/png")

    @router.get("/test-image")
    def test_image(run: str | None = None) -> dict[str, Any]:
        s, x, label = store.test_image(run, rng)
        return {"run": s.name, "label": label, "image": png_data_uri(x)}

    @router.post("/predict")
    async def predict(files: list[UploadFile] = File(..., description="One or more images."),
                      run: str | None = Form(None, description="A run name from /api/runs (default: the "
                                                               "best by validation accuracy)."),
                      attention: bool = Form(False, description="Also return each image's attention map "
                                             "(Grad-CAM; saliency for an MLP) as a 32x32 RGBA PNG to lay "
                                             "over it.")) -> dict[str, Any]:
        if len(files) > MAX_FILES:
            raise RequestError(413, f"{len(files)} files in one request; expected at most {MAX_FILES}")
        uploads = []
        for i, f in enumerate(files):
            name = f.filename or f"file{i}"
            data = await f.read(MAX_BYTES + 1)
            if len(data) > MAX_BYTES:
                raise RequestError(413, f"file '{name}' is over {MAX_BYTES // (1024 * 1024)} MB; "
                                        f"expected a smaller image")
            uploads.append((name, data))
        s, images, probs = await store.predict(run, uploads)
        if metrics is not None:
            metrics.images.labels(s.name).inc(len(uploads))
        classes = s.loaded.classes if s.loaded else ()
        out = [{"file": name, "class": classes[int(p.argmax())],
                "probabilities": {c: round(float(v), 6) for c, v in zip(classes, p, strict=True)},
                "image": png_data_uri(x)}
               for (name, _), p, x in zip(uploads, probs, images, strict=True)]
        if attention:
            await _add_attention(store, s, images, probs, out)
        return {"run": s.name, "predictions": out}
    return router


def _add_error_handlers(app: Any) -> None:
    """Every error a client can meet is {"error": "one line"} with a 4xx (a bug: a 500)."""
    from fastapi import Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException

    @app.exception_handler(RequestError)
    def _request_error(request: Request, e: RequestError) -> JSONResponse:
        return JSONResponse({"error": str(e)}, status_code=e.status)

    @app.exception_handler(Cifar4Error)
    def _cifar4_error(request: Request, e: Cifar4Error) -> JSONResponse:
        return JSONResponse({"error": str(e)}, status_code=400)

    @app.exception_handler(StarletteHTTPException)
    def _http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
        return JSONResponse({"error": str(e.detail)}, status_code=e.status_code)

    @app.exception_handler(RequestValidationError)
    def _invalid(request: Request, e: RequestValidationError) -> JSONResponse:
        first = e.errors()[0] if e.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body") or "request"
        return JSONResponse({"error": f"{where}: {first.get('msg', 'invalid request')}"}, status_code=422)

    @app.exception_handler(Exception)
    def _unexpected(request: Request, e: Exception) -> JSONResponse:
        return JSONResponse({"error": f"internal error ({type(e).__name__}); see the server's log"},
                            status_code=500)


def create_app(runs: list[Path] | None = None, data: str | Path | None = None, lab: Path | None = None,
               search: tuple[Path, ...] = SEARCH, device: torch.device | None = None,
               token: str | None = None, metrics: bool = True) -> Any:
    """The FastAPI application (a test can drive it with TestClient; `serve` runs it). Its
    models load in the background when it starts (TestClient: inside `with`), else on first use."""
    fastapi = _require_serve(metrics)
    from fastapi import Security
    from fastapi.security import HTTPBearer
    from fastapi.staticfiles import StaticFiles

    token = check_token(token)
    report_dir = _report_dir(lab) if lab is not None else None
    if lab is not None and not runs:
        search = (*search, Path(lab) / "runs")
    counters = ServerMetrics() if metrics else None
    store = ModelStore(find_runs(runs, search), data, device, *(counters.hooks() if counters else (None, None)))

    @contextlib.asynccontextmanager
    async def lifespan(app: Any) -> Any:
        threading.Thread(target=store.load_all, name="cifar4-load", daemon=True).start()
        yield

    app = fastapi.FastAPI(title="cifar4", description="Classify images with trained cifar4 runs.",
                          version=_version(), lifespan=lifespan)
    app.state.store, app.state.metrics = store, counters
    _add_error_handlers(app)
    app.include_router(_ops_router(store, _page_html(), counters))
    # TokenGuard enforces the token; the declaration only puts it in /docs (its Authorize button)
    declared = [Security(HTTPBearer(auto_error=False, description="The token `serve` was started with."))]
    app.include_router(_api_router(store, counters, declared if token else []))
    static = resources.files("cifar4.serving") / "static"
    app.mount("/static", StaticFiles(directory=str(static)), name="static")
    if report_dir is not None:
        app.mount("/report", StaticFiles(directory=str(report_dir), html=True), name="report")
    if token is not None:
        app.add_middleware(TokenGuard, token=token)
    if counters is not None:
        app.add_middleware(counters.middleware)  # outermost: 401s are counted and timed too
    return app


async def _add_attention(store: ModelStore, s: Served, images: list[np.ndarray], probs: np.ndarray,
                         out: list[dict[str, Any]]) -> None:
    """Each prediction's attention map (an RGBA PNG data URI), computed off the event loop."""
    method, heat = await asyncio.to_thread(store.attention, s, images, probs.argmax(1))
    for o, h in zip(out, heat, strict=True):
        o.update({"attention": png_data_uri(h), "attention_method": method})


def _decode_upload(name: str, data: bytes, size: int) -> np.ndarray:
    """An upload at `size` px: the size the model was trained on."""
    if not data:
        raise RequestError(400, f"file '{name}' is empty; expected an image")
    try:
        return decode_image(data, name, MAX_PIXELS, size=size)
    except ImageError as e:
        status = 413 if "pixel" in str(e) else 400
        raise RequestError(status, str(e)) from None


def _report_dir(lab: Path) -> Path:
    for cand in (Path(lab), Path(lab) / "report"):
        if (cand / "index.html").is_file():
            return cand
    raise RunError(f"--lab-dir '{lab}' holds no report (index.html); run 'cifar4 lab' first")


def _version() -> str:
    from importlib import metadata
    try:
        return metadata.version("cifar4")
    except metadata.PackageNotFoundError:
        return "0.0.0"


def serve(runs: list[Path] | None = None, host: str = "127.0.0.1", port: int = 8000,
          data: str | Path | None = None, lab: Path | None = None, log: Any = print,
          token: str | None = None, metrics: bool = True) -> None:
    """Run the server until SIGTERM or Ctrl-C, then finish the requests in flight and return.
    Listening beyond the loopback needs a token (`token`, else the CIFAR4_TOKEN variable)."""
    token = check_token(token if token is not None else (os.environ.get(TOKEN_ENV) or None))
    if token is None and not is_loopback(host):
        raise ConfigError(f"--host {host} listens beyond this machine and needs a token: pass --token TOKEN "
                          f"or set {TOKEN_ENV} (or listen on 127.0.0.1)")
    app = create_app(runs, data, lab, token=token, metrics=metrics)
    import uvicorn
    store: ModelStore = app.state.store
    log(f"serving {len(store.runs)} run(s) (default: {store.default}) on http://{host}:{port}/ "
        f"(API docs: /docs; {'access token required' if token else 'no access token'}"
        f"{'; metrics: /metrics' if metrics else ''})")
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning",
                                           timeout_graceful_shutdown=GRACE_S))
    # uvicorn catches SIGTERM and SIGINT, shuts down gracefully, then raises the signal again
    # for the handlers it found: the CLI's (which stop training with KeyboardInterrupt) would
    # turn a clean stop into an "interrupted" exit 130. A stopped server has nothing to save.
    main = threading.current_thread() is threading.main_thread()
    previous = {sig: signal.signal(sig, _stopped) for sig in (signal.SIGTERM, signal.SIGINT)} if main else {}
    try:
        server.run()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _stopped(signum: int, frame: Any) -> None:
    """The signal uvicorn raises again after its graceful shutdown: nothing left to do."""
