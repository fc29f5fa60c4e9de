"""``spml-deploy index build|add``, ``query`` and ``serve``: the segment index, its queries and the
HTTP service."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from spml_deploy.cli import CONTEXT, cli, ray_kwargs, ray_options


class _Coords(click.ParamType):
    """``X,Y`` or ``X,Y,W,H`` in whole pixels (fractions are refused, not rounded)."""

    def __init__(self, n: int, what: str):
        self.n, self.what = n, what
        self.name = "X,Y" if n == 2 else "X,Y,W,H"

    def convert(self, value, param, ctx):
        if isinstance(value, tuple):
            return value
        from spml_deploy.serving.segments import QueryError, parse_coords

        try:
            return parse_coords(value, self.n, self.what)
        except QueryError as exc:
            self.fail(f"{exc.message} ({exc.fix})", param, ctx)


def _index_options(nlist: int | None, nprobe: int | None, ef_search: int | None) -> dict:
    return {k: v for k, v in (("nlist", nlist), ("nprobe", nprobe), ("ef_search", ef_search))
            if v is not None}


def _index_segmenter(model: Path | str, ray_address: str | None, ray_workers: int | None,
                     ray_cpus: int, batch: int, backend: str, device: str):
    """None (the build segments in this process) or the Ray segmenter of --ray."""
    if ray_address is None:
        return None
    from spml_deploy.serving.ray_job import ray_segmenter

    return ray_segmenter(model, **ray_kwargs(ray_address, ray_workers, ray_cpus), batch=batch,
                         backend=backend, device=device)


@cli.group("index", context_settings=CONTEXT)
def index_group() -> None:
    """Segment index of an image collection, for 'spml-deploy query' and 'serve --index'."""


@index_group.command("build", context_settings=CONTEXT)
@click.argument("model", type=click.Path(path_type=Path))
@click.argument("images", type=str)
@click.option("--out", type=click.Path(path_type=Path), required=True,
              help="Index folder to create (segments.sqlite + prototypes.npz).")
@click.option("--index-type", type=click.Choice(["flat", "ivf", "ivfpq", "hnsw"]), default="flat",
              show_default=True, help="flat: exact search; ivf/ivfpq/hnsw: approximate, for "
                                      "millions of segments (ivf/ivfpq are trained on this build).")
@click.option("--nlist", type=click.IntRange(min=1),
              help="ivf/ivfpq: inverted lists (default min(4 sqrt(n), n/39)).")
@click.option("--nprobe", type=click.IntRange(min=1),
              help="ivf/ivfpq: lists visited per query (default max(16, nlist/32)).")
@click.option("--ef-search", type=click.IntRange(min=1), help="hnsw: search breadth (default 64).")
@click.option("--flip/--no-flip", default=True, show_default=True,
              help="Average each image's embeddings with those of its mirror image before "
                   "segmenting (two network passes per image; better retrieval). Kept by the "
                   "index: 'index add' and every query embed the same way.")
@click.option("--backend", type=click.Choice(["torch", "onnxruntime", "tensorrt"]), default="torch",
              show_default=True)
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda or cuda:N.")
@click.option("--batch", default=4, show_default=True, type=click.IntRange(min=1),
              help="Images per network call.")
@click.option("--shards", type=click.IntRange(min=1), default=1, show_default=True,
              help="Split the FAISS index into this many shards by segment id (files "
                   "prototypes.shard-S-of-N.npz; on several GPUs with faiss-gpu); queries merge "
                   "their results, the same hits as one index for flat.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@ray_options
def index_build(model: Path, images: str, out: Path, index_type: str, nlist: int | None,
                nprobe: int | None, ef_search: int | None, flip: bool, backend: str, device: str,
                batch: int, shards: int, as_json: bool, quiet: bool, ray_address: str | None,
                ray_workers: int | None, ray_cpus: int) -> None:
    """Index every image of IMAGES with MODEL (a run folder or bundle) into --out.

    \b
    IMAGES: a folder (searched recursively), a glob ('photos/**/*.jpg') or a .txt list.
    Each image is cut into k-means segments of the learned embedding (averaged with
    its mirror image's unless --no-flip; the model's test grid, 12x12 by default);
    every segment is stored with its unit prototype, predicted class, box, area and mask, and
    every image with its path relative to IMAGES (what 'serve' shows) and a hash of its pixels
    (so a query with an indexed image can leave that image out).
    Unreadable images are reported (failed.txt) and skipped; exit code 1 then.
    An interrupted build keeps the finished batches: finish it with 'spml-deploy index add'.
    """
    from spml_deploy.serving.ingest import build_index

    options = _index_options(nlist, nprobe, ef_search)
    if shards > 1:
        options["shards"] = shards
    try:
        report = build_index(model, images, out, index_type=index_type, backend=backend,
                             device=device, batch=batch, progress=not quiet,
                             index_options=options, flip=flip,
                             segmenter=_index_segmenter(model, ray_address, ray_workers, ray_cpus,
                                                        batch, backend, device))
    except KeyboardInterrupt:
        click.echo("interrupted: finished batches are stored; complete the index with "
                   f"'spml-deploy index add {out} {images}'", err=True)
        sys.exit(130)
    click.echo(json.dumps(report.to_dict(), indent=2) if as_json else report.format())
    if report.failed:
        sys.exit(1)


@index_group.command("add", context_settings=CONTEXT)
@click.argument("index_dir", type=click.Path(path_type=Path))
@click.argument("images", type=str)
@click.option("--model", type=click.Path(path_type=Path),
              help="Run folder or bundle (default: the one the index was built with; it must "
                   "hold the same weights).")
@click.option("--backend", type=click.Choice(["torch", "onnxruntime", "tensorrt"]), default="torch",
              show_default=True)
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda or cuda:N.")
@click.option("--batch", default=4, show_default=True, type=click.IntRange(min=1),
              help="Images per network call.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@ray_options
def index_add(index_dir: Path, images: str, model: Path | None, backend: str, device: str,
              batch: int, as_json: bool, quiet: bool, ray_address: str | None,
              ray_workers: int | None, ray_cpus: int) -> None:
    """Add the images of IMAGES that INDEX_DIR does not hold yet (same path = already indexed).

    Rerunning an interrupted 'index build' or 'index add' with the same IMAGES resumes it.
    Images below the folder given to 'index build' are named relative to it, others relative
    to IMAGES.
    """
    from spml_deploy.serving.ingest import add_to_index, index_model

    try:
        segmenter = _index_segmenter(model or index_model(index_dir), ray_address, ray_workers,
                                     ray_cpus, batch, backend, device)
        report = add_to_index(index_dir, images, model_path=model, backend=backend,
                              device=device, batch=batch, progress=not quiet, segmenter=segmenter)
    except KeyboardInterrupt:
        click.echo("interrupted: finished batches are stored; rerun the same command to resume",
                   err=True)
        sys.exit(130)
    click.echo(json.dumps(report.to_dict(), indent=2) if as_json else report.format())
    if report.failed:
        sys.exit(1)


@cli.command("query", context_settings=CONTEXT)
@click.argument("index_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.argument("image", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--point", type=_Coords(2, "point"),
              help="Query with the segment under this pixel (whole pixels).")
@click.option("--box", type=_Coords(4, "box"),
              help="Query with the pooled embedding inside this box (whole pixels).")
@click.option("--mask", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              metavar="M.png", help="Query with the pooled embedding inside this mask (image "
                                    "size; non-black = inside).")
@click.option("-k", "k", default=10, show_default=True, type=click.IntRange(min=1),
              help="Number of segments to return.")
@click.option("--class", "class_name", metavar="NAME",
              help="Only segments predicted as this class.")
@click.option("--exclude-self/--include-self", default=True, show_default=True,
              help="Leave out the segments of IMAGE itself when it is in the index (same "
                   "decoded pixels; otherwise its own neighbouring segments fill the top hits).")
@click.option("--model", type=click.Path(exists=True, path_type=Path),
              help="Run folder or bundle (default: the one the index was built with).")
@click.option("--backend", type=click.Choice(["torch", "onnxruntime", "tensorrt"]), default="torch",
              show_default=True)
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda or cuda:N.")
@click.option("--json", "as_json", is_flag=True,
              help="Print the hits as JSON (image: path relative to the indexed folder, path: "
                   "the full local path).")
@click.option("--show", type=click.Path(dir_okay=False, path_type=Path), metavar="OUT.png",
              help="Also draw the query and the retrieved segments, highlighted in their images.")
def query_cmd(index_dir: Path, image: Path, point: tuple | None, box: tuple | None,
              mask: Path | None, k: int, class_name: str | None, exclude_self: bool,
              model: Path | None, backend: str, device: str, as_json: bool,
              show: Path | None) -> None:
    """Find the indexed segments most similar to a point, box or mask on IMAGE.

    Coordinates are whole pixels of IMAGE as a viewer shows it (EXIF orientation applied).
    Give exactly one of --point, --box, --mask. Hits are listed with the full path of their
    image on this machine (the HTTP service shows paths relative to the indexed folder).
    """
    from spml_deploy.data.imageio import read_image
    from spml_deploy.serving.retrieval import Retriever, render_hits
    from spml_deploy.serving.segments import query_region, read_mask

    if sum(v is not None for v in (point, box, mask)) != 1:
        raise click.UsageError("give exactly one of --point X,Y, --box X,Y,W,H or --mask M.png")
    if show is not None and show.parent.exists() and not show.parent.is_dir():
        raise click.BadParameter(f"{show.parent} is a file, not a folder", param_hint="--show")
    img = read_image(image)
    mask_arr = read_mask(mask) if mask is not None else None
    with Retriever(index_dir, model, backend=backend, device=device) as r:
        r.class_id(class_name)                          # unknown class: error before any work
        seg = r.segment(img)
        hits, desc = r.query(img, point=point, box=box, mask=mask_arr, k=k,
                             class_name=class_name, exclude_self=exclude_self, seg=seg)
        if show is not None:
            render_hits(hits, show, query_image=img,
                        query_mask=query_region(seg, point=point, box=box, mask=mask_arr))
    if as_json:
        click.echo(json.dumps({"query": desc, "hits": [h.to_dict(local_paths=True)
                                                       for h in hits]}, indent=2))
    else:
        click.echo(f"query: {desc}")
        if desc.get("excluded_images"):
            click.echo("IMAGE is in the index: its own segments are left out (--include-self "
                       "keeps them)")
        for rank, h in enumerate(hits, 1):
            x, y, w, h_ = h.box
            click.echo(f"{rank:3d}  {h.score:.4f}  {h.class_name:<14} {h.image}  "
                       f"box {x},{y},{w},{h_}  segment {h.segment_id}")
        if not hits:
            click.echo("no hits" + (f" of class {class_name}" if class_name else ""))
    if show is not None:
        click.echo(f"drawing: {show}")


def _finite(ctx, param, value):
    """Refuse nan/inf (click's FloatRange lets nan through)."""
    import math

    if value is not None and not math.isfinite(value):
        raise click.BadParameter(f"{value} is not a finite number", ctx=ctx, param=param)
    return value


@cli.command("serve", context_settings=CONTEXT)
@click.argument("model", type=click.Path(exists=True, path_type=Path))
@click.option("--index", "index_dir", type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Segment index folder (enables POST /v1/query).")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on (the service has no authentication: keep loopback "
                   "unless a proxy in front of it handles access).")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(1, 65535),
              help="TCP port.")
@click.option("--backend", type=click.Choice(["torch", "onnxruntime", "tensorrt"]), default="torch",
              show_default=True)
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda or cuda:N.")
@click.option("--max-upload-mb", default=16.0, show_default=True, callback=_finite,
              type=click.FloatRange(min=0, min_open=True, max=1024 * 1024),
              help="Largest request body accepted (413 above).")
@click.option("--max-pixels", default=40_000_000, show_default=True, type=click.IntRange(min=1),
              help="Largest image accepted, from its header, before decoding (413 above).")
@click.option("--max-k", default=100, show_default=True, type=click.IntRange(min=1),
              help="Largest k for /v1/query.")
@click.option("--max-concurrent", default=2, show_default=True, type=click.IntRange(min=1),
              help="Requests decoded and run at once (each may take the memory stated above).")
@click.option("--max-queue", default=8, show_default=True, type=click.IntRange(min=0),
              help="Requests waiting for a slot (at most 1 MiB of memory per uploaded file, "
                   "the rest in a temporary file); more get 503 with Retry-After.")
@click.option("--threads", type=click.IntRange(min=1),
              help="torch intra-op threads for the model (default: one per CPU; 1 is often "
                   "faster on a small shared CPU).")
def serve_cmd(model: Path, index_dir: Path | None, host: str, port: int, backend: str,
              device: str, max_upload_mb: float, max_pixels: int, max_k: int,
              max_concurrent: int, max_queue: int, threads: int | None) -> None:
    """HTTP service: POST /v1/segment, POST /v1/query (with --index), GET /healthz, docs at /docs.

    \b
    curl -F image=@photo.jpg http://127.0.0.1:8000/v1/segment
    curl -F image=@photo.jpg -F point=120,80 -F k=5 http://127.0.0.1:8000/v1/query

    Memory: one request can take up to about 50 bytes per pixel of --max-pixels (an RGBA
    upload with an RGBA mask; 6-10 for RGB or grey images) plus twice --max-upload-mb, 2.0 GB
    at the defaults (0.4 GB for RGB). At most --max-concurrent requests take it at once; the
    --max-queue waiting ones hold at most 1 MiB per uploaded file; more get 503 with
    Retry-After.
    """
    from spml_deploy.serving.http import serve

    def announce(url: str, memory: int) -> None:
        click.echo(f"serving {model}" + (f" with index {index_dir}" if index_dir else "")
                   + f" on {url} (docs: /docs); requests take at most about "
                   f"{memory / 1e9:.1f} GB at once", err=True)

    serve(model, index_dir, host=host, port=port, backend=backend, device=device,
          max_upload_bytes=int(max_upload_mb * 1024 * 1024), max_pixels=max_pixels, max_k=max_k,
          max_concurrent=max_concurrent, max_queue=max_queue, threads=threads,
          announce=announce)
