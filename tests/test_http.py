"""The HTTP service, started for real (uvicorn on 127.0.0.1, free port) and called with httpx."""
from __future__ import annotations

import base64
import io
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("fastapi")
pytest.importorskip("faiss")
uvicorn = pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

from PIL import Image  # noqa: E402

from runs import make_run  # noqa: E402

from spml_deploy.artifacts import read_manifest, write_manifest  # noqa: E402
from spml_deploy.data.imageio import read_image  # noqa: E402
from spml_deploy.engine.pipeline import load_pipeline
from spml_deploy.serving import retrieval as R  # noqa: E402
from spml_deploy.serving import ingest as IN  # noqa: E402
from spml_deploy.serving.http import create_app  # noqa: E402
from spml_deploy.data.synth import synthesize  # noqa: E402

@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """Small tensors on a shared 2-core machine: one intra-op thread is many times faster than
    two contending ones (measured 50 ms vs 1.9 s per query under load)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


MAX_UPLOAD = 300_000
MAX_PIXELS = 500_000


def small_run(folder: Path) -> Path:
    """An untrained tiny run with the scene classes, deployed at 64 px (fast on the CPU)."""
    from dataclasses import replace

    from spml_deploy.data.synth import SCENE_CLASSES

    make_run(folder, num_classes=9)
    m = read_manifest(folder)
    m.preprocess = replace(m.preprocess, max_side=64)
    m.classes = list(SCENE_CLASSES)
    write_manifest(folder, m)
    return folder


def _png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


class LiveServer:
    """uvicorn in a background thread on a socket bound to 127.0.0.1:0."""

    def __init__(self, app):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]},
                                       daemon=True)

    def __enter__(self) -> "LiveServer":
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert self.thread.is_alive() and time.monotonic() < deadline, "server did not start"
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.sock.close()


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("http")
    run = small_run(root / "run")
    synthesize(root / "data", n_train=5, n_val=2, size=64, seed=1)
    IN.build_index(run, root / "data" / "images" / "train_*.png", root / "idx", progress=False)
    app = create_app(run, root / "idx", max_upload_bytes=MAX_UPLOAD, max_pixels=MAX_PIXELS,
                     max_k=20)
    with LiveServer(app) as srv, httpx.Client(base_url=srv.url, timeout=60) as client:
        yield {"root": root, "run": run, "client": client, "url": srv.url,
               "image": root / "data" / "images" / "val_00000.png"}


def test_healthz(setup):
    r = setup["client"].get("/healthz")
    assert r.status_code == 200
    body = r.json()
    assert body["status"] == "ok" and body["model"]["classes"][1] == "disc"
    assert body["index"]["images"] == 5 and body["index"]["segments"] > 0
    assert body["index"]["flip"] is True                       # the index default, reported
    assert setup["client"].get("/openapi.json").json()["paths"].keys() >= {
        "/v1/segment", "/v1/query", "/healthz"}


def test_segment_matches_pipeline(setup):
    data = setup["image"].read_bytes()
    r = setup["client"].post("/v1/segment", files={"image": ("x.png", data, "image/png")})
    assert r.status_code == 200, r.text
    body = r.json()
    labels = np.asarray(Image.open(io.BytesIO(base64.b64decode(body["label_png"]))))
    pipe = load_pipeline(setup["run"])
    expected = pipe.predict([read_image(setup["image"])])[0].labels
    assert np.array_equal(labels, expected)
    assert (body["width"], body["height"]) == (64, 64)
    assert sum(c["pixels"] for c in body["classes"]) == 64 * 64
    for c in body["classes"]:
        assert c["pixels"] == int((expected == c["id"]).sum())
    r = setup["client"].post("/v1/segment?format=png", files={"image": ("x.png", data)})
    assert r.headers["content-type"] == "image/png"
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(r.content))), expected)


def test_query_matches_library(setup):
    data = setup["image"].read_bytes()
    r = setup["client"].post("/v1/query", files={"image": ("q.png", data)},
                             data={"point": "20,30", "k": "6"})
    assert r.status_code == 200, r.text
    hits = r.json()["hits"]
    ref = R.query(setup["root"] / "idx", None, setup["image"], point=(20, 30), k=6)
    assert [h["segment_id"] for h in hits] == [h.segment_id for h in ref]
    assert np.allclose([h["score"] for h in hits], [h.score for h in ref], atol=1e-5)
    r = setup["client"].post("/v1/query", files={"image": ("q.png", data)},
                             data={"box": "10,10,20,20", "k": "3"})
    assert r.status_code == 200 and len(r.json()["hits"]) == 3
    mask = np.zeros((64, 64), np.uint8)
    mask[10:30, 10:30] = 255
    r2 = setup["client"].post("/v1/query", data={"k": "3"},
                              files={"image": ("q.png", data), "mask": ("m.png", _png(mask))})
    assert r2.status_code == 200
    assert [h["segment_id"] for h in r2.json()["hits"]] == [h["segment_id"] for h in r.json()["hits"]]


@pytest.mark.parametrize("case", ["garbage", "truncated", "text", "empty", "gif", "bomb",
                                  "oversized", "point_outside", "box_outside", "no_point",
                                  "both", "k_too_big", "bad_class", "path_not_file"])
def test_bad_requests_are_4xx_and_service_survives(setup, case):
    c = setup["client"]
    good = setup["image"].read_bytes()
    files = {"image": ("x.png", good, "image/png")}
    form = {"point": "5,5"}
    url, expected = "/v1/query", 422
    if case == "garbage":
        files, expected = {"image": ("x.png", b"\x00\x01 definitely not an image" * 20)}, 415
    elif case == "truncated":
        files = {"image": ("x.png", good[: len(good) // 2])}
    elif case == "text":
        files, expected = {"image": ("x.txt", b"hello", "text/plain")}, 415
    elif case == "empty":
        files = {"image": ("x.png", b"")}
    elif case == "gif":
        buf = io.BytesIO()
        Image.new("RGB", (8, 8)).save(buf, format="GIF")
        files, expected = {"image": ("x.gif", buf.getvalue())}, 415
    elif case == "bomb":      # small file, header declares 1500 x 1500 > MAX_PIXELS
        data = _png(np.zeros((1500, 1500), np.uint8))
        assert len(data) < MAX_UPLOAD
        files, expected = {"image": ("bomb.png", data)}, 413
    elif case == "oversized":
        noise = np.random.default_rng(0).integers(0, 255, (400, 400, 3), dtype=np.uint8)
        files, expected = {"image": ("big.png", _png(noise))}, 413
        url = "/v1/segment"
    elif case == "point_outside":
        form = {"point": "64,10"}
    elif case == "box_outside":
        form = {"box": "50,50,20,5"}
    elif case == "no_point":
        form = {}
    elif case == "both":
        form = {"point": "1,1", "box": "0,0,4,4"}
    elif case == "k_too_big":
        form = {"point": "1,1", "k": "21"}
    elif case == "bad_class":
        form = {"point": "1,1", "class_name": "unicorn"}
    elif case == "path_not_file":      # a server path is not accepted in place of an upload
        files, form = None, {"image": "/etc/passwd", "point": "1,1"}
    r = c.post(url, files=files, data=form)
    assert r.status_code == expected, (r.status_code, r.text)
    if r.headers.get("content-type", "").startswith("application/json"):
        assert r.json().get("detail")
    # the service keeps serving
    ok = c.post("/v1/query", files={"image": ("x.png", good)}, data={"point": "5,5", "k": "2"})
    assert ok.status_code == 200 and len(ok.json()["hits"]) == 2


def test_streamed_oversized_body_is_413(setup):
    """No Content-Length (chunked): the limit is enforced on the received bytes."""
    def chunks():      # a well-formed multipart body, sent chunked, larger than the limit
        yield (b'--abc\r\nContent-Disposition: form-data; name="image"; filename="x.png"\r\n'
               b"Content-Type: image/png\r\n\r\n")
        for _ in range(40):
            yield b"x" * 10_000
        yield b"\r\n--abc--\r\n"

    r = httpx.post(setup["url"] + "/v1/segment", content=chunks(),
                   headers={"content-type": "multipart/form-data; boundary=abc"}, timeout=30)
    assert r.status_code == 413
    assert setup["client"].get("/healthz").status_code == 200


def test_concurrent_requests(setup):
    data = setup["image"].read_bytes()

    def one(i: int):
        with httpx.Client(base_url=setup["url"], timeout=60) as c:
            if i % 3 == 0:
                r = c.post("/v1/segment", files={"image": ("x.png", data)})
                return r.status_code, len(r.json()["classes"])
            r = c.post("/v1/query", files={"image": ("x.png", data)},
                       data={"point": "20,30", "k": "5"})
            return r.status_code, tuple(h["segment_id"] for h in r.json()["hits"])

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(one, range(24)))
    assert all(code == 200 for code, _ in results)
    queries = {res for i, (_, res) in enumerate(results) if i % 3}
    assert len(queries) == 1          # identical answers under concurrency


def test_service_without_index(tmp_path):
    run = small_run(tmp_path / "run")
    app = create_app(run)
    with LiveServer(app) as srv:
        img = np.full((40, 30, 3), 120, np.uint8)
        r = httpx.post(srv.url + "/v1/query", files={"image": ("x.png", _png(img))},
                       data={"point": "1,1"})
        assert r.status_code == 404 and "--index" in r.json()["fix"]
        assert httpx.get(srv.url + "/healthz").json()["index"] is None
        r = httpx.post(srv.url + "/v1/segment", files={"image": ("x.png", _png(img))})
        assert r.status_code == 200 and (r.json()["width"], r.json()["height"]) == (30, 40)
