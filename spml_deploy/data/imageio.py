"""Image and label-map input/output shared by every stage (Pillow based).

Conventions
-----------
* Images are returned as height x width x 3 ``uint8`` RGB arrays, in the orientation a viewer
  shows them: the EXIF orientation tag is applied. Every pixel coordinate in this project
  (annotations, label maps, predictions) refers to that oriented image.
* Grayscale is replicated to three channels; palette images are expanded; 16-bit images are
  scaled to 8 bits by keeping the high byte (``v >> 8``, so 65535 -> 255); 32-bit integer images
  are treated as 16-bit (clipped to 0..65535 first); float images are scaled by 255 when their
  values lie in [0, 1] and clipped to 0..255 otherwise; CMYK/YCbCr/LAB/HSV are converted to RGB.
* Transparency (RGBA, LA, palette with transparency) is composited on black:
  ``rgb * alpha / 255`` (rounded). The colour under a fully transparent pixel is often
  undefined, so compositing gives the same array whatever tool wrote the file.
* Decompression bombs are refused before any pixel is decoded: the pixel count declared in the
  header is compared with ``max_pixels`` (default :data:`DEFAULT_MAX_PIXELS`, or the environment
  variable ``SPML_MAX_PIXELS``; change it per call or process-wide with :func:`set_max_pixels`).
* Files and folders created through temporary names (:func:`atomic_write_bytes`,
  :func:`make_temp_dir`, :func:`make_temp_file`) get the permissions the user's umask gives a
  plain ``open``/``mkdir``, not the owner-only ones of :mod:`tempfile`.
* Label maps are single-channel PNGs (palette "P" or grayscale "L") holding class ids; 255
  means ignore / unlabeled. They are written atomically as palette PNGs.
"""
from __future__ import annotations

import functools
import io
import logging
import os
import tempfile
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from spml_deploy.errors import ConfigError, ImageReadError

log = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_MAX_PIXELS", "IMAGE_EXTENSIONS", "set_max_pixels", "get_max_pixels", "read_image",
    "image_size", "read_label_png", "encode_label_png", "write_label_png", "default_palette",
    "atomic_write_bytes", "png_is_complete",
    "atomic_write_text", "make_temp_dir", "make_temp_file", "current_umask", "MAX_PIXELS_ENV",
]

DEFAULT_MAX_PIXELS = 100_000_000
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")
_EXIF_ORIENTATION = 0x0112
# EXIF orientation -> Pillow transpose (same table as PIL.ImageOps.exif_transpose).
_ORIENT_OPS = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
MAX_PIXELS_ENV = "SPML_MAX_PIXELS"
_max_pixels: int | None = None          # None: SPML_MAX_PIXELS, else DEFAULT_MAX_PIXELS
_UMASK = os.umask(0)
os.umask(_UMASK)


def set_max_pixels(n: int) -> None:
    """Set the process-wide decompression-bomb limit (pixels declared in an image header)."""
    global _max_pixels
    if int(n) < 1:
        raise ValueError(f"max_pixels must be positive, got {n}")
    _max_pixels = int(n)


def get_max_pixels() -> int:
    """The process-wide decompression-bomb limit in pixels: :func:`set_max_pixels`'s value, else
    the environment variable ``SPML_MAX_PIXELS``, else :data:`DEFAULT_MAX_PIXELS`."""
    if _max_pixels is not None:
        return _max_pixels
    raw = os.environ.get(MAX_PIXELS_ENV, "").strip()
    if not raw:
        return DEFAULT_MAX_PIXELS
    try:
        value = int(raw.replace("_", ""))
    except ValueError:
        try:
            value = int(float(raw))          # 2e8
        except (ValueError, OverflowError):
            value = 0
    if value < 1:
        raise ConfigError(f"{MAX_PIXELS_ENV}={raw!r} is not a positive number of pixels",
                          fix=f"unset it (default {DEFAULT_MAX_PIXELS:,}) or set e.g. "
                              f"{MAX_PIXELS_ENV}=200000000")
    return value


def _limit_fix(explicit: bool) -> str:
    if explicit:
        return "downscale the image (the limit was set by the caller)"
    return (f"downscale the image, or raise the limit with the environment variable "
            f"{MAX_PIXELS_ENV} (e.g. {MAX_PIXELS_ENV}=400000000 spml-deploy ...)")


# --------------------------------------------------------------------------------------------
# opening


def _open(path: Path, max_pixels: int | None, min_side: int) -> Image.Image:
    """Open ``path`` lazily (header only) and check it before any pixel is decoded."""
    limit = get_max_pixels() if max_pixels is None else int(max_pixels)
    if not path.exists():
        raise ImageReadError("file not found", path=path,
                             fix="check the path (and file_name in annotations.json)")
    if not path.is_file():
        raise ImageReadError("is not a file", path=path, fix="point to an image file")
    if path.stat().st_size == 0:
        raise ImageReadError("file is empty (0 bytes)", path=path,
                             fix="re-copy or re-export the image")
    # Pillow's own bomb check (warning above MAX_IMAGE_PIXELS, error above twice that) must not
    # fire before ours; raise its limit process-wide when a caller allows more.
    if Image.MAX_IMAGE_PIXELS is not None and limit > 2 * Image.MAX_IMAGE_PIXELS:
        Image.MAX_IMAGE_PIXELS = limit
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(path)
    except Image.DecompressionBombError as exc:
        raise ImageReadError(f"header declares more than the limit of {limit:,} pixels (refused "
                             "before decoding as a possible decompression bomb)", path=path,
                             fix=_limit_fix(max_pixels is not None)) from exc
    except UnidentifiedImageError as exc:
        raise ImageReadError("not an image Pillow can read (unknown or corrupt header)",
                             path=path, fix="save it as PNG or JPEG") from exc
    except Exception as exc:  # noqa: BLE001 - any failure reading a user file is a user error
        raise ImageReadError(f"cannot read image: {exc}", path=path,
                             fix="re-export the image as PNG or JPEG") from exc
    w, h = im.size
    if w * h > limit:
        im.close()
        raise ImageReadError(
            f"header declares {w}x{h} = {w * h:,} pixels, more than the limit of {limit:,} "
            "(refused before decoding as a possible decompression bomb)", path=path,
            fix=_limit_fix(max_pixels is not None))
    if w < min_side or h < min_side:
        im.close()
        raise ImageReadError(f"image is {w}x{h}; both sides must be at least {min_side} pixels",
                             path=path, fix="remove the image or replace it with a real one")
    return im


def _orientation(im: Image.Image) -> int:
    """EXIF orientation (1..8) read from the header only; 1 when absent or unreadable."""
    try:
        if im.format == "PNG":
            # PngImageFile.getexif() decodes the whole image when no eXIf chunk precedes the
            # pixel data; only the header's eXIf chunk is used (what image_size can see too).
            raw = im.info.get("exif")
            if not raw:
                return 1
            exif = Image.Exif()
            exif.load(raw)
        else:
            exif = im.getexif()
        value = int(exif.get(_EXIF_ORIENTATION, 1))
    except Exception as exc:  # noqa: BLE001 - broken EXIF must not make an image unreadable
        log.debug("ignoring unreadable EXIF in %s: %s", getattr(im, "filename", "?"), exc)
        return 1
    return value if value in _ORIENT_OPS else 1


def _raw_size(im: Image.Image) -> tuple[int, int]:
    """(width, height) as stored, before EXIF orientation.

    Recent Pillow versions report TIFF sizes already oriented (and transpose TIFFs on load);
    the stored size comes from the TIFF tags so that every version gives the same answer.
    """
    tags = getattr(im, "tag_v2", None)
    if im.format == "TIFF" and tags is not None and 256 in tags and 257 in tags:
        return int(tags[256]), int(tags[257])
    return im.size


def _pillow_applied_orientation(im: Image.Image) -> bool:
    """Whether Pillow already applied the EXIF orientation while loading (TIFF, Pillow >= 8)."""
    tags = getattr(im, "tag_v2", None)
    return im.format == "TIFF" and tags is not None and _EXIF_ORIENTATION not in tags


def _load(im: Image.Image, path: Path) -> None:
    """Decode every pixel so truncated or corrupt files fail here, not later."""
    try:
        im.load()
    except Exception as exc:  # noqa: BLE001 - truncated data raises OSError, SyntaxError, ...
        raise ImageReadError(f"image data is truncated or corrupt: {exc}", path=path,
                             fix="re-copy or re-export the image") from exc


def _to_rgb(im: Image.Image) -> np.ndarray:
    """Decoded Pillow image of any mode -> height x width x 3 uint8 RGB array."""
    mode = im.mode
    if mode.startswith("I;16"):
        gray = (np.asarray(im).astype(np.uint32) >> 8).astype(np.uint8)
        return np.repeat(gray[:, :, None], 3, axis=2)
    if mode == "I":
        gray = (np.clip(np.asarray(im), 0, 65535).astype(np.uint32) >> 8).astype(np.uint8)
        return np.repeat(gray[:, :, None], 3, axis=2)
    if mode == "F":
        arr = np.nan_to_num(np.asarray(im, dtype=np.float64), nan=0.0)
        if arr.size and arr.min() >= 0.0 and arr.max() <= 1.0:
            arr = arr * 255.0
        gray = np.clip(np.rint(arr), 0, 255).astype(np.uint8)
        return np.repeat(gray[:, :, None], 3, axis=2)
    if mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    elif mode in ("PA", "LA", "La", "RGBa"):
        im = im.convert("RGBA")
    if im.mode == "RGBA":
        arr = np.asarray(im).astype(np.uint32)
        alpha = arr[:, :, 3:4]
        return ((arr[:, :, :3] * alpha + 127) // 255).astype(np.uint8)
    if im.mode != "RGB":
        im = im.convert("RGB")
    return np.array(im, dtype=np.uint8)


# --------------------------------------------------------------------------------------------
# public reading API


def read_image(path: str | Path, *, max_pixels: int | None = None, min_side: int = 2) -> np.ndarray:
    """Read an image file as a height x width x 3 uint8 RGB array (EXIF orientation applied).

    Raises :class:`ImageReadError` for a missing, empty, non-image, truncated or corrupt file, an
    image with a side shorter than ``min_side`` and a header declaring more than ``max_pixels``
    pixels (checked before decoding; ``None`` = the process-wide limit).
    """
    path = Path(path)
    im = _open(path, max_pixels, min_side)
    try:
        orientation = _orientation(im)
        if _fast_png(im):
            arr = _decode_png_rgb8(path, im.size)
            if arr is not None:
                return _apply_orientation(arr, orientation)
        _load(im, path)
        if _pillow_applied_orientation(im):
            orientation = 1
        try:
            arr = _to_rgb(im)
        except Exception as exc:  # noqa: BLE001 - exotic modes Pillow cannot convert
            raise ImageReadError(f"cannot convert image mode {im.mode!r} to RGB: {exc}",
                                 path=path, fix="save it as 8-bit RGB PNG or JPEG") from exc
    finally:
        im.close()
    return _apply_orientation(arr, orientation)


def _fast_png(im: Image.Image) -> bool:
    """Whether ``im`` is a plain 8-bit RGB or grayscale PNG (no palette, alpha or transparency
    key), the common case that OpenCV decodes to the same pixels faster than Pillow."""
    return (im.format == "PNG" and im.mode in ("RGB", "L") and "transparency" not in im.info
            and im.info.get("interlace", 0) == 0)


def _decode_png_rgb8(path: Path, size: tuple[int, int]) -> np.ndarray | None:
    """Decode a plain 8-bit PNG with OpenCV as height x width x 3 RGB, or ``None`` when OpenCV
    is missing or fails (truncated, corrupt): the caller then takes the Pillow path, which
    reports the problem."""
    try:
        import cv2
    except ImportError:  # pragma: no cover - opencv is a dependency; Pillow still works
        return None
    data = np.fromfile(path, dtype=np.uint8)
    bgr = cv2.imdecode(data, cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION)
    if bgr is None or bgr.shape != (size[1], size[0], 3):
        return None
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def _apply_orientation(arr: np.ndarray, orientation: int) -> np.ndarray:
    """Apply an EXIF orientation to an array whose first two axes are rows, columns."""
    if orientation == 1:
        return arr
    ops = {
        2: lambda a: a[:, ::-1],
        3: lambda a: a[::-1, ::-1],
        4: lambda a: a[::-1],
        5: lambda a: a.swapaxes(0, 1),
        6: lambda a: np.rot90(a, k=-1),
        7: lambda a: np.rot90(a, k=2).swapaxes(0, 1),
        8: lambda a: np.rot90(a, k=1),
    }
    return np.ascontiguousarray(ops[orientation](arr))


def image_size(path: str | Path, *, max_pixels: int | None = None,
               min_side: int = 2) -> tuple[int, int]:
    """(width, height) of an image after EXIF orientation, from its header (no full decode).

    Raises :class:`ImageReadError` like :func:`read_image` does for problems visible in the
    header (truncated pixel data is only found by :func:`read_image`).
    """
    path = Path(path)
    im = _open(path, max_pixels, min_side)
    try:
        w, h = _raw_size(im)
        orientation = _orientation(im)
    finally:
        im.close()
    return (h, w) if orientation in (5, 6, 7, 8) else (w, h)


def read_label_png(path: str | Path, *, max_pixels: int | None = None) -> np.ndarray:
    """Read a label map (palette "P" or grayscale "L" PNG of class ids) as height x width uint8.

    Palette images give their palette indices (the class ids), not colours. 16-bit grayscale
    is accepted when every value is at most 255. Colour (RGB/RGBA) label maps are refused: a
    colour-coded mask must be converted to class ids first. EXIF orientation is applied.
    """
    path = Path(path)
    im = _open(path, max_pixels, min_side=1)
    try:
        orientation = _orientation(im)
        _load(im, path)
        if _pillow_applied_orientation(im):
            orientation = 1
        mode = im.mode
        if mode in ("P", "L"):
            arr = np.array(im, dtype=np.uint8)
        elif mode == "1":
            arr = np.array(im.convert("L"), dtype=np.uint8) // 255
        elif mode.startswith("I;16") or mode == "I":
            wide = np.asarray(im).astype(np.int64)
            if wide.size and (wide.min() < 0 or wide.max() > 255):
                raise ImageReadError(
                    f"label map ({mode}) holds values up to {int(wide.max())}; class ids must "
                    "be 0..254 with 255 = ignore", path=path,
                    fix="save the label map as an 8-bit single-channel PNG of class ids")
            arr = wide.astype(np.uint8)
        else:
            raise ImageReadError(
                f"label map has mode {mode!r}; a label map must be a single-channel PNG "
                "(palette 'P' or grayscale 'L') of class ids", path=path,
                fix="convert colour-coded masks to class ids and save them as 'P' or 'L' PNG "
                    "(spml_deploy.data.imageio.write_label_png does this)")
    finally:
        im.close()
    return _apply_orientation(arr, orientation)


# --------------------------------------------------------------------------------------------
# writing


def default_palette(n: int = 256) -> list[tuple[int, int, int]]:
    """``n`` distinct RGB colours, PASCAL-VOC style (bits of the index interleaved into R, G, B).

    Index 0 is black; index 255 (ignore) is white when ``n`` is larger than 255.
    """
    palette = []
    for i in range(n):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        palette.append((r, g, b))
    if n > 255:
        palette[255] = (255, 255, 255)
    return palette


def encode_label_png(labels: np.ndarray, palette: list[tuple[int, int, int]] | None = None) -> bytes:
    """A height x width array of class ids (0..255) as palette-PNG bytes.

    ``palette`` lists RGB colours for ids 0..len-1 (the rest come from :func:`default_palette`),
    so the file shows colours in a viewer while its pixel values stay the class ids.
    """
    labels = np.asarray(labels)
    if labels.ndim != 2:
        raise ValueError(f"labels must be a 2-D array of class ids, got shape {labels.shape}")
    if labels.dtype != np.uint8:
        if labels.size and (labels.min() < 0 or labels.max() > 255):
            raise ValueError(f"labels must lie in 0..255, got {labels.min()}..{labels.max()}")
        labels = labels.astype(np.uint8)
    im = Image.fromarray(np.ascontiguousarray(labels))
    im.putpalette(_palette_bytes(palette))
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


@functools.lru_cache(maxsize=1)
def _default_palette_bytes() -> bytes:
    return bytes(v for rgb in default_palette(256) for v in rgb)


def _palette_bytes(palette: list[tuple[int, int, int]] | None) -> bytes:
    """The 768-byte RGB palette of a label PNG: ``palette`` for ids 0..len-1 (at most 256),
    :func:`default_palette` for the rest."""
    out = bytearray(_default_palette_bytes())
    colours = list(palette or [])[:256]
    if colours:
        out[: 3 * len(colours)] = bytes(int(v) for rgb in colours for v in rgb)
    return bytes(out)


def write_label_png(path: str | Path, labels: np.ndarray,
                    palette: list[tuple[int, int, int]] | None = None, *,
                    durable: bool = True) -> Path:
    """Write :func:`encode_label_png` of ``labels`` to ``path`` atomically (parent folders are
    created; ``durable`` as in :func:`atomic_write_bytes`). Returns the path written."""
    return atomic_write_bytes(path, encode_label_png(labels, palette), durable=durable)


_PNG_IEND = b"\x00\x00\x00\x00IEND\xaeB`\x82"


def png_is_complete(path: str | Path) -> bool:
    """Whether ``path`` is a PNG file that ends with its IEND chunk (cheap: reads 8 + 12 bytes).

    Used to resume batch jobs that write without ``fsync``: after a power loss a file renamed
    into place may be empty or cut short, and such a file must be redone, not skipped.
    """
    try:
        with open(path, "rb") as f:
            if f.read(8) != b"\x89PNG\r\n\x1a\n":
                return False
            f.seek(-len(_PNG_IEND), os.SEEK_END)
            return f.read() == _PNG_IEND
    except OSError:
        return False


def atomic_write_bytes(path: str | Path, data: bytes, *, durable: bool = True) -> Path:
    """Write ``data`` to ``path`` atomically (temporary file in the same folder + os.replace).

    Readers see either the old file or the complete new one, never a partial write, also when
    the process is killed. Parent folders are created. ``durable``: ``fsync`` the data before
    the rename, so that it also survives a power loss or kernel crash (it costs a disk flush per
    file; batch outputs that are checked on resume, see :func:`png_is_complete`, skip it).
    Returns the path.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        # mkstemp creates the file 0600; give it the permissions a plain open() would have.
        mode = path.stat().st_mode & 0o777 if path.exists() else 0o666 & ~current_umask()
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    return path


def current_umask() -> int:
    """The process's umask, read without changing it (``/proc/self/status`` on Linux; elsewhere
    the umask at import time, as reading it there means setting it, which is not thread-safe)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    return _UMASK


def make_temp_dir(parent: str | Path, prefix: str = "", suffix: str = "") -> Path:
    """A new folder in ``parent`` (``tempfile.mkdtemp``) with the permissions a plain ``mkdir``
    would give it (``0777 & ~umask``), for outputs built under a temporary name and renamed
    into place; mkdtemp's own 0700 would make them private to their owner."""
    tmp = Path(tempfile.mkdtemp(prefix=prefix, suffix=suffix, dir=parent))
    os.chmod(tmp, 0o777 & ~current_umask())
    return tmp


def make_temp_file(parent: str | Path, prefix: str = "", suffix: str = "") -> tuple[int, Path]:
    """(open descriptor, path) of a new file in ``parent`` (``tempfile.mkstemp``) with the
    permissions a plain ``open`` would give it (``0666 & ~umask``) instead of mkstemp's 0600."""
    fd, name = tempfile.mkstemp(prefix=prefix, suffix=suffix, dir=parent)
    os.fchmod(fd, 0o666 & ~current_umask())
    return fd, Path(name)


def atomic_write_text(path: str | Path, text: str, encoding: str = "utf-8") -> Path:
    """Write ``text`` to ``path`` atomically (see :func:`atomic_write_bytes`)."""
    return atomic_write_bytes(path, text.encode(encoding))
