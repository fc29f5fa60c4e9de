"""Load test: several clients send valid, malformed and oversized requests at once to the
service in its own process on 127.0.0.1, for a bounded number of requests and seconds. Every
valid query must get exactly the library's hits, every bad request its documented 4xx with
detail and fix, and the service's resident memory must stay under the stated bound
(request_memory_bytes x max_concurrent, plus allocator slack). Figures at a larger scale:
benchmarks/http_load.py, benchmarks/results/http_load.md."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("faiss")
pytest.importorskip("uvicorn")
pytest.importorskip("httpx")
if not Path("/proc/self/status").is_file():
    pytest.skip("reads memory from /proc (Linux)", allow_module_level=True)

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import http_load as L  # noqa: E402
from test_http import _one_torch_thread, small_run  # noqa: E402,F401

from spml_deploy.data.imageio import read_image  # noqa: E402
from spml_deploy.serving import retrieval as R  # noqa: E402
from spml_deploy.serving import ingest as IN  # noqa: E402
from spml_deploy.serving.http import request_memory_bytes  # noqa: E402
from spml_deploy.data.synth import synthesize  # noqa: E402

MAX_PIXELS = 1_000_000
MAX_UPLOAD = 400_000
MAX_CONCURRENT = 2
SLACK = 64 * 2 ** 20          # allocator arenas, threads, Python objects of in-flight requests
BIG_SIDE = 900                # a valid image near the pixel limit (0.81 Mpx)
K = 5


def test_mixed_load_answers_every_valid_request_within_bounded_memory(tmp_path):
    run = small_run(tmp_path / "run")
    synthesize(tmp_path / "data", n_train=5, n_val=4, size=64, seed=4)
    images = tmp_path / "data" / "images"
    IN.build_index(run, images / "train_*.png", tmp_path / "idx", progress=False)
    bodies = L.payloads(images, MAX_PIXELS, MAX_UPLOAD, BIG_SIDE)
    jobs = L.mixed_jobs(64, bad_fraction=0.5, big_fraction=0.1, n_val=len(bodies["val"]),
                        size=64, seed=1)
    assert {kind for kind, *_ in jobs} >= set(L.BAD) | {"query", "big", "segment"}
    # the library's answers to every valid query, computed here
    val = [read_image(p) for p in sorted(images.glob("val_*.png"))]
    big = L.big_image(BIG_SIDE)
    expected = {}
    with R.Retriever(tmp_path / "idx") as r:
        for kind, i, x, y in jobs:
            if kind in ("query", "big"):
                hits, _ = r.query(big if kind == "big" else val[i], point=(x, y), k=K)
                expected[(kind, i, x, y)] = [h.segment_id for h in hits]

    server, url, health = L.start_server(run, tmp_path / "idx", max_pixels=MAX_PIXELS,
                                         max_upload_bytes=MAX_UPLOAD,
                                         max_concurrent=MAX_CONCURRENT, max_queue=16)
    try:
        import httpx

        with httpx.Client(base_url=url, timeout=60) as c:         # warm-up
            for kind in ("query", "big", "segment"):
                assert L.send(c, (kind, 0, 5, 5), bodies, K, 100)[1] == 200
        res = L.run_load(url, server.pid, jobs, bodies, clients=4, k=K, max_k=100, seconds=90,
                         expected_for=lambda job: expected[tuple(job)])
    finally:
        L.stop_server(server)
    assert res["errors"] == []
    assert res["sent"] == len(jobs), f"only {res['sent']} of {len(jobs)} requests in 90 s"
    growth = res["rss_peak"] - res["rss_base"]
    bound = MAX_CONCURRENT * request_memory_bytes(MAX_PIXELS, MAX_UPLOAD) + SLACK
    assert growth < bound, f"RSS grew by {growth / 2**20:.0f} MiB, bound {bound / 2**20:.0f} MiB"
    assert res["rss_peak"] >= res["rss_base"] > 50 * 2 ** 20       # the sampler saw the server
    assert np.isfinite(res["wall"]) and res["bad"] > 0
