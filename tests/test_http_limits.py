"""The HTTP service's answers to bad requests ({"detail", "fix"} for every 4xx), its bounded
concurrency (503 + Retry-After beyond the queue, at most max_concurrent decodes at once), and
what /v1/query reveals of the server (relative image names, the query image left out)."""
from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("faiss")
httpx = pytest.importorskip("httpx")

from test_http import LiveServer, _one_torch_thread, small_run  # noqa: E402,F401

from spml_deploy.serving import http as H  # noqa: E402
from spml_deploy.serving import ingest as IN  # noqa: E402
from spml_deploy.data.synth import synthesize  # noqa: E402


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("httplim")
    run = small_run(root / "run")
    synthesize(root / "data", n_train=5, n_val=2, size=64, seed=1)
    IN.build_index(run, root / "data" / "images" / "train_*.png", root / "idx", progress=False)
    return root, run, root / "idx"


@pytest.fixture(scope="module")
def client(built):
    root, run, idx = built
    app = H.create_app(run, idx, max_upload_bytes=300_000, max_pixels=500_000, max_k=20)
    with LiveServer(app) as srv, httpx.Client(base_url=srv.url, timeout=60) as c:
        yield c


def _image(built) -> bytes:
    return (built[0] / "data" / "images" / "val_00000.png").read_bytes()


@pytest.mark.parametrize("case,status,names", [
    ("no_image", 422, "image"), ("k_text", 422, "k"), ("k_zero", 422, "k"),
    ("k_too_big", 422, "k"), ("bad_format", 422, "format"), ("bad_exclude_self", 422,
                                                               "exclude_self"),
    ("json_body", 422, "image"), ("point_fraction", 422, "point"), ("box_fraction", 422, "box"),
    ("unknown_route", 404, "Not Found"), ("wrong_method", 405, "Method Not Allowed"),
    ("bad_multipart", 400, "multipart")])
def test_every_4xx_has_detail_and_fix(built, client, case, status, names):
    img = {"image": ("x.png", _image(built), "image/png")}
    method, url, kwargs = "POST", "/v1/query", {"files": img, "data": {"point": "5,5"}}
    if case == "no_image":
        kwargs = {"data": {"point": "5,5"}, "files": {"other": ("x.png", b"abc")}}
    elif case == "k_text":
        kwargs["data"] = {"point": "5,5", "k": "ten"}
    elif case == "k_zero":
        kwargs["data"] = {"point": "5,5", "k": "0"}
    elif case == "k_too_big":
        kwargs["data"] = {"point": "5,5", "k": "21"}
    elif case == "bad_format":
        url, kwargs = "/v1/segment?format=xml", {"files": img}
    elif case == "bad_exclude_self":
        kwargs["data"] = {"point": "5,5", "exclude_self": "maybe"}
    elif case == "json_body":
        kwargs = {"json": {"image": "/etc/passwd", "point": "5,5"}}
    elif case == "point_fraction":
        kwargs["data"] = {"point": "1.5,2.5"}
    elif case == "box_fraction":
        kwargs["data"] = {"box": "0,0,10.5,4"}
    elif case == "unknown_route":
        url = "/v1/nothing"
    elif case == "wrong_method":
        method, kwargs = "GET", {}
    elif case == "bad_multipart":
        kwargs = {"content": b"--x\r\nbroken", "headers": {
            "content-type": "multipart/form-data"}}            # no boundary
    r = client.request(method, url, **kwargs)
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"detail", "fix"}, body
    assert isinstance(body["fix"], str) and body["fix"]
    assert names in body["detail"], body
    if case == "k_too_big":
        assert "20" in body["fix"]                     # the service's max_k
    if case in ("point_fraction", "box_fraction"):
        assert "whole pixels" in body["detail"]
    if case == "wrong_method":
        assert "POST" in r.headers["allow"]            # the framework's headers are kept


def test_hits_name_images_relative_to_the_indexed_folder(built, client):
    """No server path in /v1/query answers; an indexed query image is left out by default and
    comes back first (cosine 1) with exclude_self=false."""
    root = built[0]
    indexed = (root / "data" / "images" / "train_00001.png").read_bytes()
    r = client.post("/v1/query", files={"image": ("q.png", indexed)},
                    data={"point": "20,30", "k": "20"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert str(root) not in r.text and "/tmp" not in r.text
    names = {h["image"] for h in body["hits"]}
    assert names <= {f"train_{i:05d}.png" for i in range(5)}
    assert "train_00001.png" not in names and len(body["hits"]) == 20
    assert body["query"]["in_index"] is True and body["query"]["excluded_images"] == 1
    r = client.post("/v1/query", files={"image": ("q.png", indexed)},
                    data={"point": "20,30", "k": "3", "exclude_self": "false"})
    top = r.json()["hits"][0]
    assert top["image"] == "train_00001.png" and top["score"] == pytest.approx(1, abs=1e-5)
    assert isinstance(top["image_id"], int)


def test_busy_service_answers_503_with_retry_after(built):
    """max_concurrent=1, max_queue=0: while one request runs, the next gets 503 with
    Retry-After (before its body is parsed) and the first still completes."""
    root, run, idx = built
    app = H.create_app(run, idx, max_concurrent=1, max_queue=0)
    service = app.state.service
    inside, release = threading.Event(), threading.Event()
    segment = service.segment

    def slow_segment(image):
        inside.set()
        assert release.wait(30)
        return segment(image)

    service.segment = slow_segment
    data = _image(built)
    with LiveServer(app) as srv, ThreadPoolExecutor(1) as pool:
        first = pool.submit(httpx.post, srv.url + "/v1/segment",
                            files={"image": ("x.png", data)}, timeout=60)
        assert inside.wait(30)
        busy = httpx.post(srv.url + "/v1/query", files={"image": ("x.png", data)},
                          data={"point": "1,1"}, timeout=30)
        assert busy.status_code == 503 and busy.headers["retry-after"] == "1"
        assert set(busy.json()) == {"detail", "fix"} and "--max-concurrent" in busy.json()["fix"]
        assert httpx.get(srv.url + "/healthz").status_code == 200     # not counted
        release.set()
        assert first.result().status_code == 200
        again = httpx.post(srv.url + "/v1/segment", files={"image": ("x.png", data)}, timeout=60)
        assert again.status_code == 200


def test_decoding_and_model_work_are_bounded(built, monkeypatch):
    """At most max_concurrent requests are between the start of their decode and the end of
    their model work (where the decoded image is held), however many clients send at once;
    the others wait (max_queue) and are answered."""
    root, run, idx = built
    app = H.create_app(run, idx, max_concurrent=2, max_queue=10)
    service = app.state.service
    lock = threading.Lock()
    state = {"active": 0, "peak": 0}
    decode, segment = H.decode_upload, service.segment

    def counting_decode(*args, **kwargs):
        with lock:
            state["active"] += 1
            state["peak"] = max(state["peak"], state["active"])
        time.sleep(0.3)
        return decode(*args, **kwargs)

    def counting_segment(image):
        try:
            return segment(image)
        finally:
            with lock:
                state["active"] -= 1

    monkeypatch.setattr(H, "decode_upload", counting_decode)
    service.segment = counting_segment
    data = _image(built)
    with LiveServer(app) as srv, ThreadPoolExecutor(6) as pool:
        codes = list(pool.map(lambda _: httpx.post(srv.url + "/v1/segment",
                                                   files={"image": ("x.png", data)},
                                                   timeout=60).status_code, range(6)))
    assert codes == [200] * 6
    assert state["peak"] == 2 and state["active"] == 0


def test_memory_statement():
    assert H.request_memory_bytes(40_000_000, 16 * 2**20) == 50 * 40_000_000 + 32 * 2**20
    with pytest.raises(Exception, match="max_concurrent"):
        H.create_app(Path("/nonexistent"), max_concurrent=0)



def test_a_finished_answer_frees_its_slot_before_cleanup():
    """AdmissionMiddleware at the ASGI level: once a request's answer is complete, its slot is
    free, even while the app still cleans up after it (FastAPI closes uploads after the
    response): the client's next request is admitted, not refused with 503."""
    import asyncio

    cleanup = asyncio.Event()
    statuses: list[int] = []

    async def app(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})
        if scope["path"] == "/v1/first":
            await cleanup.wait()                      # still running after its answer

    mw = H.AdmissionMiddleware(app, max_active=1, drain_bytes=1000)

    async def request(path: str) -> None:
        async def receive():
            return {"type": "http.request", "body": b"", "more_body": False}

        async def send(message):
            if message["type"] == "http.response.start":
                statuses.append(message["status"])

        await mw({"type": "http", "path": path, "headers": []}, receive, send)

    async def main():
        first = asyncio.create_task(request("/v1/first"))
        while not statuses:
            await asyncio.sleep(0)
        await request("/v1/second")                   # the first one's answer is complete
        cleanup.set()
        await first
        assert mw.active == 0

    asyncio.run(main())
    assert statuses == [200, 200]

