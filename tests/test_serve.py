"""The server: the JSON API with FastAPI's TestClient (good and bad uploads, runs ranked by
validation accuracy, concurrency), and the page in a real Chromium against a real uvicorn."""

from __future__ import annotations

import io
import json
import shutil
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

from cifar4.serving.server import MAX_BYTES, MAX_FILES, create_app  # noqa: E402


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """Two runs of different quality on the tiny data, and the data file."""
    from conftest import make_arrays
    root = tmp_path_factory.mktemp("serve")
    X, Y, t = make_arrays()
    npz = root / "d.npz"
    np.savez(npz, X=X, Y=Y, is_test=t)
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


# ---------------------------------------------------------------- a real server, a real browser

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def live_server(served):
    root, npz, _, runs = served
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "cifar4", "serve", *[str(r.run_dir) for r in runs],
                             "--port", str(port), "--data", str(npz)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    end = time.monotonic() + 60
    while time.monotonic() < end:
        try:
            with urllib.request.urlopen(url + "/api/health", timeout=2) as r:
                if json.load(r)["status"] == "ok":
                    break
        except OSError:
            time.sleep(0.2)
    else:
        proc.kill()
        pytest.fail(f"the server did not start: {proc.communicate()[1][-2000:]}")
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
