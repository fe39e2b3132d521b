"""The server: the JSON API with FastAPI's TestClient (good and bad uploads, runs ranked by
validation accuracy, concurrency, the access token, metrics and readiness), a real uvicorn
process stopped by SIGTERM under load, and the page in a real Chromium (desktop and phone width)."""

from __future__ import annotations

import http.client
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request

import numpy as np
import pytest
from PIL import Image

from cifar4 import config
from cifar4.training import pipeline

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from cifar4.serving.server import MAX_BYTES, MAX_FILES, create_app, is_loopback  # noqa: E402

TOKEN = "s3cret-Token-for-the-class"


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """Two runs of different quality on the tiny data, and the data file."""
    from conftest import save_tiny
    root = tmp_path_factory.mktemp("serve")
    npz = save_tiny(root / "d.npz")
    from cifar4.data import load
    ds = load(npz)
    runs = []
    for name, epochs in (("weak", 1), ("strong", 4)):
        e = config.from_dict({"name": name, "model": {"name": "cnn"}, "train": {"epochs": epochs, "batch_size": 16}})
        runs.append(pipeline.train(e, ds, run_dir=root / "runs" / name, progress=False))
    return root, npz, ds, runs


@pytest.fixture
def client(served):
    root, npz, _, runs = served
    return TestClient(create_app([r.run_dir for r in runs], data=npz))


def png(x: np.ndarray, size=(64, 64), fmt="PNG") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(x).resize(size).save(buf, format=fmt)
    return buf.getvalue()


def test_health_runs_and_the_default_is_the_best_by_validation(client, served):
    runs = served[3]
    assert client.get("/api/health").json()["status"] == "ok"
    body = client.get("/api/runs").json()
    vals = [r["val_accuracy"] for r in body["runs"]]
    assert vals == sorted(vals, reverse=True)
    best = max(runs, key=lambda r: r.metrics["val_accuracy"])
    assert body["default"] == best.run_dir.name == body["runs"][0]["name"]
    assert client.get(body["runs"][0]["curves"]).headers["content-type"] == "image/png"
    assert client.get("/docs").status_code == 200 and "/api/predict" in client.get("/openapi.json").text


def test_predict_one_and_several_images(client, served):
    ds = served[2]
    files = [("files", (f"img{i}.png", png(ds.X[i]), "image/png")) for i in range(3)]
    files.append(("files", ("photo.jpg", png(ds.X[3], (300, 200), "JPEG"), "image/jpeg")))
    r = client.post("/api/predict", files=files, data={"run": "weak"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["run"] == "weak" and [p["file"] for p in body["predictions"]] == ["img0.png", "img1.png",
                                                                                  "img2.png", "photo.jpg"]
    for p in body["predictions"]:
        assert set(p["probabilities"]) == set(ds.classes) and p["class"] in ds.classes
        assert abs(sum(p["probabilities"].values()) - 1) < 1e-4 and p["image"].startswith("data:image/png")
    from cifar4.serving.predict import predict
    (tmp := served[0] / "check").mkdir(exist_ok=True)
    (tmp / "img0.png").write_bytes(png(ds.X[0]))
    direct = predict(served[0] / "runs" / "weak", [tmp / "img0.png"])[0]
    assert body["predictions"][0]["class"] == direct.label


@pytest.mark.parametrize("case,status,needle", [
    ("not an image", 400, "not an image"),
    ("truncated", 400, "truncated"),
    ("empty", 400, "empty"),
    ("too big", 413, "over 10 MB"),
    ("too many pixels", 413, "pixels"),
    ("too many files", 413, f"at most {MAX_FILES}"),
    ("unknown run", 404, "unknown"),
    ("no files", 422, "files"),
])
def test_bad_requests_get_a_4xx_and_one_line_of_json(client, served, case, status, needle):
    ds = served[2]
    good = png(ds.X[0])
    files = {"not an image": [("files", ("a.png", b"hello", "image/png"))],
             "truncated": [("files", ("t.png", good[:len(good) // 2], "image/png"))],
             "empty": [("files", ("e.png", b"", "image/png"))],
             "too big": [("files", ("b.png", b"\0" * (MAX_BYTES + 1), "image/png"))],
             "too many pixels": [("files", ("h.png", _huge_png(), "image/png"))],
             "too many files": [("files", (f"{i}.png", good, "image/png")) for i in range(MAX_FILES + 1)],
             "unknown run": [("files", ("a.png", good, "image/png"))],
             "no files": []}[case]
    r = client.post("/api/predict", files=files or None, data={"run": "nope"} if case == "unknown run" else {})
    assert r.status_code == status, r.text
    body = r.json()
    assert list(body) == ["error"] and needle in body["error"] and "\n" not in body["error"]


def _huge_png() -> bytes:
    buf = io.BytesIO()
    Image.new("L", (7000, 6000)).save(buf, format="PNG")  # 42 MP, a few KB compressed
    return buf.getvalue()


def test_a_test_image_comes_with_its_true_class(client, served):
    body = client.get("/api/test-image", params={"run": "strong"}).json()
    assert body["label"] in served[2].classes and body["image"].startswith("data:image/png;base64,")


def test_concurrent_requests_are_safe(client, served):
    ds = served[2]
    expected = {}
    for i in range(8):
        expected[i] = client.post("/api/predict", files=[("files", ("a.png", png(ds.X[i]), "image/png"))]).json()
    errors: list[str] = []

    def worker(i: int) -> None:
        for _ in range(5):
            r = client.post("/api/predict", files=[("files", ("a.png", png(ds.X[i]), "image/png"))])
            if r.json() != expected[i]:
                errors.append(r.text)
    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors


def test_no_run_to_serve_is_a_404_with_a_hint(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    c = TestClient(create_app())
    r = c.post("/api/predict", files=[("files", ("a.png", png(np.zeros((32, 32, 3), np.uint8)), "image/png"))])
    assert r.status_code == 404 and "cifar4 train" in r.json()["error"]


def test_serve_refuses_a_folder_that_is_not_a_run(tmp_path, capsys):
    from cifar4.cli import main
    assert main(["serve", str(tmp_path)]) == 2
    assert "not a finished run" in capsys.readouterr().err


# ---------------------------------------------------------------- the access token

GUARDED = [("GET", "/api/runs"), ("GET", "/api/runs/weak/curves.png"), ("GET", "/api/test-image"),
           ("POST", "/api/predict"), ("GET", "/metrics"), ("GET", "/api/no-such-route")]


def _basic(password: str) -> str:
    import base64
    return "Basic " + base64.b64encode(f"anyone:{password}".encode()).decode()


def test_with_a_token_every_api_route_needs_it_and_the_probes_stay_open(served):
    root, npz, ds, runs = served
    c = TestClient(create_app([r.run_dir for r in runs], data=npz, token=TOKEN))
    image = [("files", ("a.png", png(ds.X[0]), "image/png"))]
    for method, path in GUARDED:
        for headers in ({}, {"Authorization": "Bearer wrong-token-of-the-same-kind"},
                        {"Authorization": TOKEN}, {"Authorization": _basic("wrong-password")}):
            r = c.request(method, path, headers=headers, files=image if method == "POST" else None)
            assert r.status_code == 401, (method, path, headers, r.text)
            body = r.json()
            assert list(body) == ["error"] and "token" in body["error"] and "\n" not in body["error"]
            assert "wrong-token" not in r.text and TOKEN not in r.text  # never echoed
            assert r.headers["www-authenticate"].startswith("Bearer")
    ok = {"Authorization": f"Bearer {TOKEN}"}
    assert c.get("/api/runs", headers=ok).json()["default"] in ("weak", "strong")
    assert c.get("/api/runs/weak/curves.png", headers=ok).headers["content-type"] == "image/png"
    assert c.post("/api/predict", files=image, headers=ok).status_code == 200
    assert c.get("/api/runs", headers={"Authorization": _basic(TOKEN)}).status_code == 200  # a browser's prompt
    assert "cifar4_http_requests_total" in c.get("/metrics", headers=ok).text
    # open: the page and its static files (no run's data in them), the probes, the API's docs
    for path in ("/", "/static/app.js", "/static/app.css", "/api/health", "/docs", "/openapi.json"):
        assert c.get(path).status_code == 200, path
    assert c.get("/api/ready").status_code in (200, 503)
    assert "HTTPBearer" in c.get("/openapi.json").text  # /docs offers its Authorize button


def test_the_lab_report_asks_a_browser_for_the_token(served, tmp_path):
    root, npz, _, runs = served
    (tmp_path / "index.html").write_text("<h1>the lab report</h1>")
    c = TestClient(create_app([r.run_dir for r in runs], data=npz, lab=tmp_path, token=TOKEN))
    r = c.get("/report/")
    assert r.status_code == 401 and r.headers["www-authenticate"].startswith("Basic")  # the browser's prompt
    assert "the lab report" in c.get("/report/", headers={"Authorization": _basic(TOKEN)}).text


def test_a_loopback_server_without_a_token_stays_open(client):
    assert client.get("/api/runs").status_code == 200 and client.get("/metrics").status_code == 200


@pytest.mark.parametrize("args,env,needle", [
    (["--host", "0.0.0.0"], {}, "needs a token"),
    (["--host", "192.168.1.20"], {}, "needs a token"),
    (["--host", "myhost.example"], {}, "needs a token"),
    (["--host", "0.0.0.0", "--token", "short"], {}, "at least 8"),
    (["--host", "0.0.0.0"], {"CIFAR4_TOKEN": "has a space"}, "without spaces"),
])
def test_serving_beyond_the_loopback_needs_a_usable_token(served, capsys, monkeypatch, args, env, needle):
    from cifar4.cli import main
    monkeypatch.delenv("CIFAR4_TOKEN", raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    assert main(["serve", str(served[3][0].run_dir), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and len(err.splitlines()) == 1 and "Traceback" not in err


def test_which_hosts_are_the_loopback():
    assert all(is_loopback(h) for h in ("127.0.0.1", "127.0.1.1", "localhost", "::1", "[::1]"))
    assert not any(is_loopback(h) for h in ("0.0.0.0", "::", "10.0.0.5", "example.org"))


# ---------------------------------------------------------------- readiness and metrics

def _samples(text: str) -> dict[tuple, float]:
    from prometheus_client.parser import text_string_to_metric_families
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def test_ready_once_every_model_is_loaded_and_metrics_count_what_happened(served):
    root, npz, ds, runs = served
    app = create_app([r.run_dir for r in runs], data=npz)
    c = TestClient(app)  # outside `with`: the app has not started, no model is loaded
    r = c.get("/api/ready")
    assert r.status_code == 503 and "loading models (0 of 2)" in r.json()["error"]
    assert c.get("/api/health").json()["status"] == "ok"
    with TestClient(app) as c:  # started: the models load in the background
        end = time.monotonic() + 60
        while c.get("/api/ready").status_code != 200 and time.monotonic() < end:
            time.sleep(0.05)
        assert c.get("/api/ready").json() == {"status": "ready", "runs": 2}
        files = [("files", (f"{i}.png", png(ds.X[i]), "image/png")) for i in range(3)]
        for _ in range(2):
            assert c.post("/api/predict", files=files, data={"run": "weak"}).status_code == 200
        assert c.post("/api/predict", files=[("files", ("x.png", b"nope", "image/png"))]).status_code == 400
        c.get("/api/runs/weak/nothing.png")
        text = c.get("/metrics").text
    m = _samples(text)
    assert m[("cifar4_http_requests_total", (("method", "POST"), ("route", "/api/predict"), ("status", "200")))] == 2
    assert m[("cifar4_http_requests_total", (("method", "POST"), ("route", "/api/predict"), ("status", "400")))] == 1
    assert m[("cifar4_http_requests_total",
              (("method", "GET"), ("route", "/api/runs/{name}/{figure}"), ("status", "404")))] == 1
    assert m[("cifar4_http_request_duration_seconds_count", (("route", "/api/predict"),))] == 3
    assert m[("cifar4_images_classified_total", (("run", "weak"),))] == 6
    assert m[("cifar4_batch_images_count", (("run", "weak"),))] == 2  # the bad upload never reached the model
    assert m[("cifar4_batch_images_sum", (("run", "weak"),))] == 6
    assert all(m[("cifar4_model_load_seconds", (("run", n),))] > 0 for n in ("weak", "strong"))
    assert m[("cifar4_ready", ())] == 1
    # a second app counts in a registry of its own
    other = _samples(TestClient(create_app([r.run_dir for r in runs], data=npz)).get("/metrics").text)
    assert ("cifar4_images_classified_total", (("run", "weak"),)) not in other


def test_metrics_can_be_turned_off(served):
    c = TestClient(create_app([r.run_dir for r in served[3]], data=served[1], metrics=False))
    assert c.get("/metrics").status_code == 404


# ---------------------------------------------------------------- a real server, a real browser

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_server(served, *extra: str, env: dict | None = None, runs: list | None = None
                  ) -> tuple[subprocess.Popen, str]:
    """`python -m cifar4 serve` over the runs (default: the two) on a free loopback port, once
    /api/ready is 200."""
    root, npz = served[:2]
    runs = runs or [r.run_dir for r in served[3]]
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "cifar4", "serve", *[str(r) for r in runs],
                             "--port", str(port), "--data", str(npz), *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **(env or {})})
    url = f"http://127.0.0.1:{port}"
    end = time.monotonic() + 60
    while time.monotonic() < end:
        try:
            with urllib.request.urlopen(url + "/api/ready", timeout=2) as r:
                if json.load(r)["status"] == "ready":
                    return proc, url
        except OSError:
            time.sleep(0.2)
    proc.kill()
    pytest.fail(f"the server did not start: {proc.communicate()[1][-2000:]}")


@pytest.fixture
def live_server(served):
    proc, url = _start_server(served)
    yield url
    proc.terminate()
    proc.wait(timeout=20)


@pytest.mark.slow
def test_the_page_in_a_real_browser(live_server, served, tmp_path):
    pw = pytest.importorskip("playwright.sync_api")
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if not chromium:
        pytest.skip("no chromium on the PATH (apt-get install -y chromium)")
    ds = served[2]
    Image.fromarray(ds.X[7]).resize((96, 96)).save(tmp_path / "mine.png")
    from cifar4.serving.predict import predict
    best = max(served[3], key=lambda r: r.metrics["val_accuracy"])
    expected = predict(best.run_dir, [tmp_path / "mine.png"])[0].label
    with pw.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1200, "height": 900})
        page.goto(live_server + "/")
        page.wait_for_selector("#run option", state="attached")
        assert page.input_value("#run") == best.run_dir.name  # best validation accuracy first
        assert "test accuracy" in page.inner_text("#card-facts")
        page.set_input_files("#files", [str(tmp_path / "mine.png")])
        page.wait_for_selector(".result .label")
        assert page.inner_text(".result .label") == expected
        assert page.inner_text(".result .name") == "mine.png"
        page.click("#test-image")
        page.wait_for_function("document.querySelectorAll('.result').length >= 2")
        assert "true class:" in page.inner_text(".result .truth")
        page.set_input_files("#files", [{"name": "broken.png", "mimeType": "image/png", "buffer": b"nope"}])
        page.wait_for_function("document.getElementById('message').textContent.length > 0")
        assert "not an image" in page.inner_text("#message")
        page.screenshot(path=str(tmp_path / "page.png"), full_page=True)
        browser.close()
    assert (tmp_path / "page.png").stat().st_size > 10_000  # kept in pytest's tmp folder


def test_requests_waiting_together_go_through_the_model_as_one_batch(served):
    from cifar4.runs import load_model
    from cifar4.serving.server import FORWARD_IMAGES, Batcher
    ds = served[2]
    loaded = load_model(served[3][0].run_dir)
    sizes: list[int] = []
    running, go_on = threading.Event(), threading.Event()

    def hold_the_first_pass(m, args):
        # the first forward pass waits until the other requests have queued: what queues while
        # a batch runs is then known, not left to how the threads happen to be scheduled
        sizes.append(len(args[0]))
        running.set()
        assert go_on.wait(timeout=60)

    loaded.model.register_forward_pre_hook(hold_the_first_pass)
    b = Batcher(loaded, 0, "t")
    first = b.submit([(f"{i}.png", png(ds.X[i % 200])) for i in range(MAX_FILES)] * 4)  # 128 images
    assert running.wait(timeout=60)
    rest = [b.submit([("one.png", png(ds.X[i]))]) for i in range(10)]
    bad = b.submit([("bad.png", b"nope")])
    go_on.set()
    assert len(first.result(timeout=60)[1]) == 128
    results = [f.result(timeout=60) for f in rest]
    assert all(len(r[1]) == 1 for r in results)
    with pytest.raises(Exception, match="not an image"):
        bad.result(timeout=60)
    # every forward pass takes exactly FORWARD_IMAGES images (padded), and the ten single images
    # that queued while the first batch ran went through together after it: 128 + 16 slots, where
    # one pass per waiting job would have taken 128 + 10 x 8
    assert set(sizes) == {FORWARD_IMAGES} and sum(sizes) == 128 + 16


# ---------------------------------------------------------------- stopping under load

def _post(url: str, body: bytes, boundary: str) -> tuple[float, float, str]:
    """One request on a connection of its own: (sent, answered, outcome). The outcome is the
    status, "refused" (no connection: the server had stopped listening), or "dropped" (connected,
    but no answer came)."""
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    t0 = time.monotonic()
    try:
        conn.connect()
    except ConnectionRefusedError:
        return t0, time.monotonic(), "refused"
    try:
        conn.request("POST", "/api/predict", body, {"Content-Type": f"multipart/form-data; boundary={boundary}"})
        r = conn.getresponse()
        ok = r.status == 200 and len(json.loads(r.read())["predictions"]) == 2
        return t0, time.monotonic(), "200" if ok else f"{r.status} or a bad body"
    except (ConnectionError, http.client.HTTPException):
        return t0, time.monotonic(), "dropped"
    finally:
        conn.close()


def test_sigterm_finishes_the_requests_in_flight_and_exits_0(served):
    proc, url = _start_server(served)
    # two 2000x2000 images per request (a few KB of PNG, a tenth of a second each to decode):
    # the four clients' requests are in the model's worker for about a second at a time
    buf = io.BytesIO()
    Image.new("RGB", (2000, 2000), (200, 30, 40)).save(buf, format="PNG")
    boundary = "cifar4boundary"
    part = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"files\"; filename=\"big.png\"\r\n"
            f"Content-Type: image/png\r\n\r\n").encode() + buf.getvalue() + b"\r\n"
    body = part * 2 + f"--{boundary}--\r\n".encode()
    results: list[tuple[float, float, str]] = []
    answered = threading.Semaphore(0)

    def client() -> None:
        while True:
            results.append(r := _post(url, body, boundary))
            answered.release()
            if r[2] == "refused":  # the server stopped listening
                return
    threads = [threading.Thread(target=client) for _ in range(4)]
    for t in threads:
        t.start()
    for _ in range(4):  # one round answered: the clients' next requests are now on their way
        assert answered.acquire(timeout=60)
    time.sleep(0.3)  # in the middle of that round, far from any request's start
    signalled = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    for t in threads:
        t.join(timeout=60)
    assert proc.wait(timeout=60) == 0
    stderr = proc.stderr.read() if proc.stderr else ""
    assert "Traceback" not in stderr and "interrupted" not in stderr
    before = [r for r in results if r[0] < signalled]
    assert all(outcome == "200" for _, _, outcome in before), before  # every request accepted got its answer
    assert any(done > signalled for _, done, _ in before)  # some were in flight when the signal came
    after = [r for r in results if r[0] >= signalled]
    assert after and all(outcome in ("200", "refused", "dropped") for _, _, outcome in after), after
    assert all(not t.is_alive() for t in threads)  # each client was refused in the end: it stopped listening


# ---------------------------------------------------------------- the page on a phone, with a token

OVERFLOWING = """() => [...document.querySelectorAll('body *')].filter((e) => {
    const r = e.getBoundingClientRect();
    return r.width > 0 && (r.left < -0.5 || r.right > document.documentElement.clientWidth + 0.5);
}).map((e) => e.tagName + (e.id ? '#' + e.id : '') + ' ' + e.className)"""


@pytest.mark.slow
def test_the_page_at_phone_width_asks_for_the_token_then_classifies(served, tmp_path):
    pw = pytest.importorskip("playwright.sync_api")
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if not chromium:
        pytest.skip("no chromium on the PATH (apt-get install -y chromium)")
    # a run named as real runs are: its name fills the header's model menu
    long = tmp_path / "runs" / "cifar4-cnn-augmented-2026-12-06T05-12-33-seed-0"
    shutil.copytree(served[3][1].run_dir, long)
    proc, url = _start_server(served, env={"CIFAR4_TOKEN": TOKEN}, runs=[long, served[3][0].run_dir])
    ds = served[2]
    Image.fromarray(ds.X[7]).resize((96, 96)).save(tmp_path / "mine.png")
    try:
        with pw.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 390, "height": 844})
            page.goto(url + "/")
            page.wait_for_selector("#token-form", state="visible")  # asked, since /api/runs said 401
            page.fill("#token", "not-the-token")
            page.click("#token-form button")
            page.wait_for_function("document.getElementById('token-message').textContent.includes('refused')")
            page.fill("#token", TOKEN)
            page.click("#token-form button")
            page.wait_for_selector("#run option", state="attached")
            assert page.is_hidden("#token-form")
            page.wait_for_function("document.getElementById('card-curves').naturalWidth > 0")  # fetched with the token
            page.set_input_files("#files", [str(tmp_path / "mine.png")])
            page.wait_for_selector(".result .label")
            # at 390 px: "Classify images" before the model card, the API link in view, nothing cut off
            top = page.evaluate("(id) => document.getElementById(id).getBoundingClientRect().top", "try")
            assert top < page.evaluate("(id) => document.getElementById(id).getBoundingClientRect().top", "card")
            box = page.locator("header a").bounding_box()
            assert box and box["x"] >= 0 and box["x"] + box["width"] <= 390
            assert page.evaluate("document.documentElement.scrollWidth <= document.documentElement.clientWidth")
            assert page.evaluate(OVERFLOWING) == []
            page.reload()  # the token is kept while the tab is open
            page.wait_for_selector("#run option", state="attached")
            assert page.is_hidden("#token-form")
            page.screenshot(path=str(tmp_path / "phone.png"), full_page=True)
            browser.close()
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    assert TOKEN not in (proc.stderr.read() if proc.stderr else "")  # never logged
