"""Built-in benchmark scenes: a synthetic dataset in the dataset contract, no downloads.

``spml-deploy data synth OUT`` writes ``images/``, ``masks/`` (ground truth), ``splits/`` and an
``annotations.json`` holding all four weak annotation kinds, derived from the ground truth with
:mod:`spml_deploy.data.weaken` (tags, per-instance boxes, one central point per instance plus
background points, one stroke per instance plus background strokes). Every supervision setting
of the method can therefore be trained and scored offline.

The scenes are drawn by :mod:`spml_deploy.data.synth.scenes` (design of the object scenes and of
the parts mode) from the textures and shapes of :mod:`spml_deploy.data.synth.draw`; this module
writes them as a dataset folder.

Ground truth and weak labels
----------------------------
Masks are hard label maps (uint8, palette PNG) with no 255 anywhere: borders are not marked
ambiguous (the image is blurred, the mask is not). Each image's randomness comes from
``SeedSequence([seed, split, index, mode])``, so an image does not depend on how many others
are generated, and a seed gives byte-identical files.

Speed: drawing uses OpenCV rasterisers on full-image canvases and textures computed on each
object's bounding box; ``benchmarks/synth_speed.py`` measures images per second.
"""
from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np

from spml_deploy.data.imageio import default_palette
from spml_deploy.data.synth.draw import texture_bank
from spml_deploy.data.synth.scenes import PART_CLASSES, SCENE_CLASSES, render_scene, scene_annotations
from spml_deploy.data.weaken import format_annotations
from spml_deploy.errors import ConfigError, SpmlError

log = logging.getLogger(__name__)

MIN_SIZE, MAX_SIZE = 32, 2048


def image_rng(seed: int, split: int, index: int, parts: bool) -> tuple[np.random.Generator,
                                                                       np.random.Generator]:
    """(render rng, annotation rng) of image ``index`` of split 0 (train) or 1 (val)."""
    ss = np.random.SeedSequence([int(seed), int(split), int(index), int(parts)])
    a, b = ss.spawn(2)
    return np.random.default_rng(a), np.random.default_rng(b)


def synthesize(out: str | Path, n_train: int = 200, n_val: int = 50, size: int = 128,
               seed: int = 0, parts: bool = False, overwrite: bool = False) -> str:
    """Write the benchmark scenes as a dataset folder ``out``; returns a short report.

    The dataset is built in a hidden sibling folder and renamed to ``out`` at the end, so an
    interrupted run never leaves a folder that looks complete. Refuses a non-empty ``out``
    unless ``overwrite`` (and then only one that holds a dataset: annotations.json, images/ or
    masks/), which is replaced.
    """
    out = Path(out)
    _check_args(n_train, n_val, size, seed)
    _check_out(out, overwrite)
    classes = PART_CLASSES if parts else SCENE_CLASSES
    out.parent.mkdir(parents=True, exist_ok=True)
    texture_bank()                          # load once, outside the timing
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)           # mkdtemp makes it private; the dataset is not
    t0 = time.perf_counter()
    try:
        for sub in ("images", "masks", "splits"):
            (tmp / sub).mkdir()
        images, anns, stems = [], [], {"train": [], "val": []}
        counts = dict.fromkeys(("boxes", "points", "scribbles"), 0)
        palette = _palette(len(classes))
        jobs = [("train", 0, i) for i in range(n_train)] + [("val", 1, i) for i in range(n_val)]
        for image_id, (split, code, i) in enumerate(jobs, 1):
            r_rng, a_rng = image_rng(seed, code, i, parts)
            scene = render_scene(size, r_rng, parts=parts)
            tags, new = scene_annotations(scene, a_rng)
            stem = f"{split}_{i:05d}"
            _write_rgb(tmp / "images" / f"{stem}.png", scene.image)
            _write_mask(tmp / "masks" / f"{stem}.png", scene.mask, palette)
            images.append({"id": image_id, "file_name": f"{stem}.png", "width": size,
                           "height": size, "tags": tags})
            for a in new:
                anns.append({"image_id": image_id, **a})
                key = next(k for k in ("bbox", "point", "scribble") if k in a)
                counts[{"bbox": "boxes", "point": "points", "scribble": "scribbles"}[key]] += 1
            stems[split].append(stem)
            if image_id % 100 == 0:
                log.info("synth: %d/%d images", image_id, len(jobs))
        for split, names in stems.items():
            (tmp / "splits" / f"{split}.txt").write_text("".join(s + "\n" for s in names))
        doc = {"info": {"generator": "spml-deploy data synth", "mode":
                        "parts" if parts else "scenes", "seed": seed, "size": size},
               "categories": [{"id": i, "name": n} for i, n in enumerate(classes)],
               "images": images, "annotations": anns}
        (tmp / "annotations.json").write_text(format_annotations(doc), encoding="utf-8")
        elapsed = time.perf_counter() - t0
        _install(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    n = n_train + n_val
    return "\n".join([
        f"wrote {n} {'figure' if parts else 'object'} scenes ({n_train} train, {n_val} val), "
        f"{size}x{size} px, seed {seed}, to {out}",
        f"  classes ({len(classes)}): {', '.join(classes)}",
        f"  annotations: {len(images)} images tagged, {counts['boxes']} boxes, "
        f"{counts['points']} points, {counts['scribbles']} scribbles",
        "  files: images/, masks/ (ground truth), annotations.json, splits/train.txt, "
        "splits/val.txt",
        f"  speed: {n / max(elapsed, 1e-9):.0f} images/s ({elapsed:.1f} s)",
    ])


def _check_args(n_train: int, n_val: int, size: int, seed: int) -> None:
    if n_train < 0 or n_val < 0 or n_train + n_val == 0:
        raise ConfigError(f"need at least one image (got --n-train {n_train}, --n-val {n_val})",
                          fix="pass --n-train and --n-val >= 0 with a positive sum")
    if not MIN_SIZE <= size <= MAX_SIZE:
        raise ConfigError(f"--size {size} is outside {MIN_SIZE}..{MAX_SIZE}",
                          fix=f"choose an image side between {MIN_SIZE} and {MAX_SIZE} pixels")
    if seed < 0:
        raise ConfigError(f"--seed {seed} is negative", fix="use a seed >= 0")


def _check_out(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise SpmlError("exists and is not a folder", path=out,
                        fix="choose another output folder")
    if not out.is_dir() or not any(out.iterdir()):
        return
    if not overwrite:
        raise SpmlError("output folder is not empty", path=out,
                        fix="choose a new or empty folder, or pass --overwrite to replace the "
                            "dataset in it")
    if not any((out / n).exists() for n in ("annotations.json", "images", "masks")):
        raise SpmlError("output folder is not empty and does not hold a dataset "
                        "(no annotations.json, images/ or masks/), so --overwrite will not "
                        "delete it", path=out, fix="choose a new or empty folder")


def _install(tmp: Path, out: Path) -> None:
    """Move the finished dataset ``tmp`` to ``out`` (replacing an old one, if any)."""
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _palette(n: int) -> list[int]:
    """Flat 256-colour palette (the project's default class colours, 255 = white)."""
    return [v for rgb in default_palette(256) for v in rgb]


def _write_rgb(path: Path, image: np.ndarray) -> None:
    """An RGB PNG. OpenCV's encoder with Huffman-only zlib: on these noisy images it is about
    twice as fast as the default strategy and the files are about 10 % smaller."""
    ok, buf = cv2.imencode(".png", np.ascontiguousarray(image[..., ::-1]),
                           [cv2.IMWRITE_PNG_COMPRESSION, 1,
                            cv2.IMWRITE_PNG_STRATEGY, cv2.IMWRITE_PNG_STRATEGY_HUFFMAN_ONLY])
    assert ok, "PNG encoding failed"
    path.write_bytes(buf.tobytes())


def _write_mask(path: Path, mask: np.ndarray, palette: list[int]) -> None:
    """A palette PNG of class ids (plain write: the whole folder is renamed into place)."""
    from PIL import Image

    im = Image.fromarray(np.ascontiguousarray(mask, dtype=np.uint8))
    im.putpalette(palette)      # "L" -> "P", pixel values (class ids) unchanged
    im.save(path, format="PNG")
