"""`cifar4 serve`: a trained model behind a web page and a JSON API (FastAPI + uvicorn).

    GET  /                  the page: choose a model, drop images or try a test image
    GET  /api/health        {"status": "ok", ...}
    GET  /api/runs          the runs offered, best validation accuracy first
    GET  /api/runs/NAME/curves.png, /api/runs/NAME/confusion.png   the model card's figures
    GET  /api/test-image    a random image of a run's test split, with its true class
    POST /api/predict       multipart: `files` (one or more images), optional `run`, optional
                            `attention=true` (each image's attention map as an RGBA PNG overlay)
    GET  /docs              FastAPI's OpenAPI page
    GET  /report/           the lab report, with --lab

Every model is loaded once, when first asked for, and gets one worker thread: requests queue
their uploads there, and the worker decodes them and runs everything waiting (up to MAX_BATCH
images) in forward passes of exactly FORWARD_IMAGES images, so that an upload's answer does not
depend on which other requests were waiting. One thread doing all decoding and inference keeps
memory flat under many clients (one allocator arena, no per-thread copies) and uses the cores through torch's own
threads; nothing process-wide changes per request. Bad requests
get a 4xx status and {"error": "one line"}; an unexpected failure is a 500 with a one-line
error, never a traceback.
"""

# No `from __future__ import annotations` here: FastAPI reads the endpoints' annotations at run
# time, and the fastapi types they name are imported inside create_app (an optional extra).
import asyncio
import base64
import io
import queue
import random
import threading
from concurrent.futures import Future
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import config as cfgmod
from .. import data as datamod
from ..data.images import MAX_PIXELS, decode_image
from ..data.split import split_indices
from ..device import pick_device
from ..errors import Cifar4Error, ImageError, MissingExtraError, RunError
from ..runs import LoadedModel, load_model, read_metrics
from .predict import predict_arrays

MAX_BYTES = 10 * 1024 * 1024  # per uploaded file
MAX_FILES = 32                # per request
MAX_BATCH = 256               # images the worker takes from the waiting requests at once
FORWARD_IMAGES = 8            # images per forward pass, always (padded): answers independent of batching
SEARCH = (Path("runs"), Path("lab") / "runs", Path("lab-quick") / "runs")


def _require_serve() -> Any:
    try:
        import fastapi
        import python_multipart  # noqa: F401  (FastAPI's form parser)
        import uvicorn  # noqa: F401
    except ImportError:
        raise MissingExtraError("cifar4 serve needs the 'serve' extra (fastapi, uvicorn, python-multipart); "
                          "run: pip install 'cifar4[serve]'") from None
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
    decoded gets its RequestError; the others in the batch go on."""

    def __init__(self, loaded: LoadedModel, tta: int, name: str):
        self.loaded, self.tta = loaded, tta
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
                ready.append((job, [_decode_upload(n, b) for n, b in job.uploads]))
            except RequestError as e:
                job.done.set_exception(e)
        if not ready:
            return
        try:
            X = np.stack([x for _, xs in ready for x in xs])
            n = len(X)
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
    number), each model loaded once."""

    def __init__(self, runs: list[tuple[str, Path]], data: str | Path | None = None,
                 device: torch.device | None = None):
        self.device = device or pick_device("auto")
        self.data_arg = data
        self._data: datamod.Dataset | None = None
        self._lock = threading.Lock()
        served = [Served(n, f, read_metrics(f)) for n, f in runs]
        self.runs = {s.name: s for s in sorted(served, key=lambda s: -float(s.metrics.get("val_accuracy", 0)))}

    @property
    def default(self) -> str | None:
        return next(iter(self.runs), None)

    def get(self, name: str | None) -> Served:
        if not self.runs:
            raise RequestError(404, "no finished run to serve; train one with 'cifar4 train' first")
        key = name or self.default
        if key not in self.runs:
            raise RequestError(404, f"run '{name}' is unknown; expected one of {', '.join(self.runs)}")
        s = self.runs[str(key)]
        with s.lock:
            if s.loaded is None:
                s.loaded = load_model(s.folder, device=self.device)
                s.batcher = Batcher(s.loaded, int(s.metrics.get("tta", 0)), s.name)
        return s

    async def predict(self, name: str | None, uploads: list[tuple[str, bytes]]
                      ) -> tuple[Served, list[np.ndarray], np.ndarray]:
        """Decode and classify uploads on the model's worker, batched with other requests."""
        s = self.get(name)
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
        exp = cfgmod.from_dict(cfgmod.read_toml(s.folder / "config.toml"), f"'{s.folder}/config.toml'")
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


def create_app(runs: list[Path] | None = None, data: str | Path | None = None, lab: Path | None = None,
               search: tuple[Path, ...] = SEARCH, device: torch.device | None = None) -> Any:
    """The FastAPI application (a test can drive it with TestClient; `serve` runs it)."""
    fastapi = _require_serve()
    from fastapi import File, Form, Request, UploadFile
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import FileResponse, HTMLResponse, JSONResponse
    from fastapi.staticfiles import StaticFiles
    from starlette.exceptions import HTTPException as StarletteHTTPException

    report_dir = _report_dir(lab) if lab is not None else None
    if lab is not None and not runs:
        search = (*search, Path(lab) / "runs")
    store = ModelStore(find_runs(runs, search), data, device)
    rng = random.Random()
    page = _page_html()
    app = fastapi.FastAPI(title="cifar4", description="Classify images with trained cifar4 runs.",
                          version=_version())
    app.state.store = store

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

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def index() -> str:
        return page

    @app.get("/api/health")
    def health() -> dict[str, Any]:
        return {"status": "ok", "runs": len(store.runs), "default": store.default,
                "loaded": [n for n, s in store.runs.items() if s.loaded is not None], "device": str(store.device)}

    @app.get("/api/runs")
    def list_runs() -> dict[str, Any]:
        return {"default": store.default, "runs": [s.card() for s in store.runs.values()]}

    @app.get("/api/runs/{name}/{figure}", include_in_schema=False)
    def run_figure(name: str, figure: str) -> FileResponse:
        if figure not in ("curves.png", "confusion.png"):
            raise RequestError(404, f"'{figure}' is not a run figure; expected curves.png or confusion.png")
        if name not in store.runs:
            raise RequestError(404, f"run '{name}' is unknown")
        path = store.runs[name].folder / figure
        if not path.is_file():
            raise RequestError(404, f"run '{name}' has no {figure}")
        return FileResponse(path, media_type="image/png")

    @app.get("/api/test-image")
    def test_image(run: str | None = None) -> dict[str, Any]:
        s, x, label = store.test_image(run, rng)
        return {"run": s.name, "label": label, "image": png_data_uri(x)}

    @app.post("/api/predict")
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
        classes = s.loaded.classes if s.loaded else ()
        out = [{"file": name, "class": classes[int(p.argmax())],
                "probabilities": {c: round(float(v), 6) for c, v in zip(classes, p, strict=True)},
                "image": png_data_uri(x)}
               for (name, _), p, x in zip(uploads, probs, images, strict=True)]
        if attention:
            await _add_attention(store, s, images, probs, out)
        return {"run": s.name, "predictions": out}

    static = resources.files("cifar4.serving") / "static"
    app.mount("/static", StaticFiles(directory=str(static)), name="static")
    if report_dir is not None:
        app.mount("/report", StaticFiles(directory=str(report_dir), html=True), name="report")
    return app


async def _add_attention(store: ModelStore, s: Served, images: list[np.ndarray], probs: np.ndarray,
                         out: list[dict[str, Any]]) -> None:
    """Each prediction's attention map (an RGBA PNG data URI), computed off the event loop."""
    method, heat = await asyncio.to_thread(store.attention, s, images, probs.argmax(1))
    for o, h in zip(out, heat, strict=True):
        o.update({"attention": png_data_uri(h), "attention_method": method})


def _decode_upload(name: str, data: bytes) -> np.ndarray:
    if not data:
        raise RequestError(400, f"file '{name}' is empty; expected an image")
    try:
        return decode_image(data, name, MAX_PIXELS)
    except ImageError as e:
        status = 413 if "pixel" in str(e) else 400
        raise RequestError(status, str(e)) from None


def _report_dir(lab: Path) -> Path:
    for cand in (Path(lab), Path(lab) / "report"):
        if (cand / "index.html").is_file():
            return cand
    raise RunError(f"--lab '{lab}' holds no report (index.html); run 'cifar4 lab' first")


def _version() -> str:
    from importlib import metadata
    try:
        return metadata.version("cifar4")
    except metadata.PackageNotFoundError:
        return "0.0.0"


def serve(runs: list[Path] | None = None, host: str = "127.0.0.1", port: int = 8000,
          data: str | Path | None = None, lab: Path | None = None, log: Any = print) -> None:
    """Run the server until interrupted."""
    app = create_app(runs, data, lab)
    import uvicorn
    store: ModelStore = app.state.store
    if host not in ("127.0.0.1", "localhost", "::1"):
        log(f"warning: listening on {host}: anyone who can reach this machine can use the server; "
            f"it has no authentication")
    log(f"serving {len(store.runs)} run(s) (default: {store.default}) on http://{host}:{port}/ "
        f"(API docs: /docs)")
    uvicorn.run(app, host=host, port=port, log_level="warning")
