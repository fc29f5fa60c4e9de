"""Image and label-map IO: formats, modes, EXIF orientation, refusals, atomic writes."""
from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageOps

from spml_deploy.data import imageio
from spml_deploy.errors import ImageReadError, SpmlError
from spml_deploy.data.imageio import (atomic_write_bytes, atomic_write_text, default_palette,
                                 image_size, read_image, read_label_png, write_label_png)


def _rgb(h: int = 12, w: int = 17, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _png_header_only(path: Path, width: int, height: int) -> None:
    """A PNG whose header declares width x height but that holds (almost) no pixel data."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr)
                     + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b""))


@pytest.mark.parametrize("ext,fmt,kw", [(".png", "PNG", {}), (".bmp", "BMP", {}),
                                        (".webp", "WEBP", {"lossless": True}),
                                        (".tiff", "TIFF", {})])
def test_lossless_formats_round_trip(tmp_path: Path, ext: str, fmt: str, kw: dict) -> None:
    arr = _rgb()
    path = tmp_path / f"a{ext}"
    Image.fromarray(arr).save(path, format=fmt, **kw)
    out = read_image(path)
    assert out.dtype == np.uint8 and out.shape == (12, 17, 3)
    np.testing.assert_array_equal(out, arr)
    assert image_size(path) == (17, 12)


def test_jpeg_is_read_close_to_source(tmp_path: Path) -> None:
    arr = np.full((16, 24, 3), (200, 40, 90), np.uint8)
    Image.fromarray(arr).save(tmp_path / "a.jpg", quality=95)
    out = read_image(tmp_path / "a.jpg")
    assert out.shape == (16, 24, 3)
    assert np.abs(out.astype(int) - arr).max() <= 4


def test_grayscale_palette_and_bilevel(tmp_path: Path) -> None:
    gray = np.arange(6 * 5, dtype=np.uint8).reshape(6, 5) * 8
    Image.fromarray(gray).save(tmp_path / "g.png")
    np.testing.assert_array_equal(read_image(tmp_path / "g.png"), np.stack([gray] * 3, -1))

    idx = (np.arange(20).reshape(4, 5) % 3).astype(np.uint8)
    p = Image.fromarray(idx)
    p.putpalette([10, 20, 30, 40, 50, 60, 70, 80, 90] + [0] * 759)
    p.save(tmp_path / "p.png")
    expect = np.array([[10, 20, 30], [40, 50, 60], [70, 80, 90]], np.uint8)[idx]
    np.testing.assert_array_equal(read_image(tmp_path / "p.png"), expect)

    Image.fromarray(idx > 0).save(tmp_path / "b.png")          # mode "1"
    np.testing.assert_array_equal(read_image(tmp_path / "b.png")[..., 0], (idx > 0) * 255)


def test_alpha_is_composited_on_black(tmp_path: Path) -> None:
    rgba = np.array([[[200, 100, 50, 128], [200, 100, 50, 0], [9, 8, 7, 255]]], np.uint8)
    rgba = np.repeat(rgba, 2, axis=0)
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    out = read_image(tmp_path / "a.png")
    # hand computed: round(200*128/255)=100, round(100*128/255)=50, round(50*128/255)=25
    np.testing.assert_array_equal(out[0], [[100, 50, 25], [0, 0, 0], [9, 8, 7]])

    la = np.stack([np.full((2, 3), 100, np.uint8), np.array([[255, 0, 51]] * 2, np.uint8)], -1)
    Image.fromarray(la, "LA").save(tmp_path / "la.png")
    np.testing.assert_array_equal(read_image(tmp_path / "la.png")[0, :, 0], [100, 0, 20])

    p = Image.fromarray(np.array([[0, 1], [1, 0]], np.uint8))
    p.putpalette([255, 0, 0, 0, 255, 0] + [0] * 762)
    p.info["transparency"] = 0
    p.save(tmp_path / "pt.png", transparency=0)
    out = read_image(tmp_path / "pt.png")
    np.testing.assert_array_equal(out[0], [[0, 0, 0], [0, 255, 0]])


def test_16bit_keeps_the_high_byte(tmp_path: Path) -> None:
    vals = np.array([[0, 255, 256, 65535], [32768, 511, 512, 1000]], np.uint16)
    Image.fromarray(vals).save(tmp_path / "d.png")
    assert Image.open(tmp_path / "d.png").mode.startswith("I")
    out = read_image(tmp_path / "d.png")
    np.testing.assert_array_equal(out[..., 0], [[0, 0, 1, 255], [128, 1, 2, 3]])
    np.testing.assert_array_equal(out[..., 0], out[..., 2])
    Image.fromarray(vals).save(tmp_path / "d.tiff")
    np.testing.assert_array_equal(read_image(tmp_path / "d.tiff"), out)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_matches_pillow(tmp_path: Path, orientation: int) -> None:
    arr = _rgb(6, 10, seed=orientation)
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = tmp_path / "o.png"
    Image.fromarray(arr).save(path, exif=exif)
    expect = np.asarray(ImageOps.exif_transpose(Image.open(path)).convert("RGB"))
    out = read_image(path)
    np.testing.assert_array_equal(out, expect)
    assert image_size(path) == (out.shape[1], out.shape[0])
    assert out.shape[:2] == ((10, 6) if orientation >= 5 else (6, 10))


@pytest.mark.parametrize("fmt,ext", [("JPEG", ".jpg"), ("WEBP", ".webp"), ("TIFF", ".tif")])
def test_exif_rotation_other_formats(tmp_path: Path, fmt: str, ext: str) -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise for display
    path = tmp_path / f"o{ext}"
    Image.fromarray(_rgb(6, 10)).save(path, format=fmt, exif=exif)
    expect = np.asarray(ImageOps.exif_transpose(Image.open(path)).convert("RGB"))
    out = read_image(path)
    assert out.shape == (10, 6, 3)
    np.testing.assert_array_equal(out, expect)
    assert image_size(path) == (6, 10)


def _assert_read_error(path: Path, match: str, **kw) -> ImageReadError:
    with pytest.raises(ImageReadError, match=match) as info:
        read_image(path, **kw)
    assert info.value.path == str(path) and info.value.fix
    assert isinstance(info.value, SpmlError) and info.value.exit_code == 2
    return info.value


def test_refuses_missing_empty_and_non_images(tmp_path: Path) -> None:
    _assert_read_error(tmp_path / "nope.png", "not found")
    (tmp_path / "empty.png").write_bytes(b"")
    _assert_read_error(tmp_path / "empty.png", "empty")
    (tmp_path / "text.png").write_text("hello, I am not a picture\n")
    _assert_read_error(tmp_path / "text.png", "not an image")
    _assert_read_error(tmp_path, "not a file")
    with pytest.raises(ImageReadError, match="not an image"):
        image_size(tmp_path / "text.png")


@pytest.mark.parametrize("ext", [".png", ".jpg"])
def test_refuses_truncated_files(tmp_path: Path, ext: str) -> None:
    path = tmp_path / f"t{ext}"
    Image.fromarray(_rgb(64, 64)).save(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    assert image_size(path) == (64, 64)  # the header alone is fine
    _assert_read_error(path, "truncated or corrupt")


def test_refuses_tiny_images(tmp_path: Path) -> None:
    Image.fromarray(_rgb(1, 1)).save(tmp_path / "one.png")
    _assert_read_error(tmp_path / "one.png", "1x1")
    Image.fromarray(_rgb(3, 8)).save(tmp_path / "thin.png")
    assert read_image(tmp_path / "thin.png").shape == (3, 8, 3)
    _assert_read_error(tmp_path / "thin.png", "at least 4", min_side=4)


def test_refuses_bombs_before_decoding(tmp_path: Path) -> None:
    small = tmp_path / "s.png"
    Image.fromarray(_rgb(40, 40)).save(small)
    _assert_read_error(small, "more than the limit of 1,000", max_pixels=1000)
    # Headers only: decoding would fail as truncated, so the message proves no decode happened.
    ours = tmp_path / "b1.png"
    _png_header_only(ours, 12000, 9000)  # 108 MP: above our 100 MP default, below Pillow's error
    err = _assert_read_error(ours, "108,000,000 pixels")
    assert "truncated" not in err.message
    with pytest.raises(ImageReadError, match="decompression bomb"):
        image_size(ours)
    pillows = tmp_path / "b2.png"
    _png_header_only(pillows, 30000, 30000)  # 900 MP: Pillow's own bomb error, converted
    err = _assert_read_error(pillows, "decompression bomb")
    assert "truncated" not in err.message


def test_set_max_pixels_is_process_wide(tmp_path: Path) -> None:
    path = tmp_path / "s.png"
    Image.fromarray(_rgb(40, 40)).save(path)
    old = imageio.get_max_pixels()
    try:
        imageio.set_max_pixels(1599)
        _assert_read_error(path, "limit of 1,599")
        imageio.set_max_pixels(1600)
        assert read_image(path).shape == (40, 40, 3)
    finally:
        imageio.set_max_pixels(old)
    with pytest.raises(ValueError):
        imageio.set_max_pixels(0)


def test_label_png_round_trip_is_palette_of_class_ids(tmp_path: Path) -> None:
    labels = np.array([[0, 1, 2, 255], [3, 3, 0, 1]], np.uint8)
    path = write_label_png(tmp_path / "deep" / "er" / "m.png", labels, palette=[(1, 2, 3)])
    assert path.is_file()
    im = Image.open(path)
    assert im.mode == "P"
    assert im.getpalette()[:6] == [1, 2, 3, 128, 0, 0]          # given, then VOC defaults
    assert im.getpalette()[255 * 3: 256 * 3] == [255, 255, 255]
    np.testing.assert_array_equal(read_label_png(path), labels)
    assert [p.name for p in path.parent.iterdir()] == ["m.png"]  # no temporary left behind
    write_label_png(path, labels.astype(np.int64) * 0 + 7)       # overwrite, int input
    assert (read_label_png(path) == 7).all()
    with pytest.raises(ValueError):
        write_label_png(path, np.full((2, 2), 300))
    with pytest.raises(ValueError):
        write_label_png(path, np.zeros((2, 2, 3), np.uint8))
    assert (read_label_png(path) == 7).all()


def test_label_png_modes(tmp_path: Path) -> None:
    labels = np.array([[0, 4, 9], [255, 1, 1]], np.uint8)
    Image.fromarray(labels).save(tmp_path / "l.png")               # grayscale L
    np.testing.assert_array_equal(read_label_png(tmp_path / "l.png"), labels)
    Image.fromarray(labels.astype(np.uint16)).save(tmp_path / "w.png")
    np.testing.assert_array_equal(read_label_png(tmp_path / "w.png"), labels)
    Image.fromarray(np.array([[0, 256]], np.uint16).repeat(2, 0)).save(tmp_path / "big.png")
    with pytest.raises(ImageReadError, match="values up to 256"):
        read_label_png(tmp_path / "big.png")
    Image.fromarray(np.zeros((2, 3, 3), np.uint8)).save(tmp_path / "rgb.png")
    with pytest.raises(ImageReadError, match="mode 'RGB'") as info:
        read_label_png(tmp_path / "rgb.png")
    assert "class ids" in info.value.fix
    with pytest.raises(ImageReadError, match="not found"):
        read_label_png(tmp_path / "none.png")


def test_default_palette_hand_checked() -> None:
    pal = default_palette(256)
    assert pal[:5] == [(0, 0, 0), (128, 0, 0), (0, 128, 0), (128, 128, 0), (0, 0, 128)]
    assert pal[8] == (64, 0, 0) and pal[15] == (192, 128, 128)  # VOC "person"
    assert pal[255] == (255, 255, 255)
    assert len(set(pal)) == 256
    assert default_palette(3) == pal[:3]


def test_atomic_writes(tmp_path: Path) -> None:
    target = tmp_path / "a" / "b.txt"
    atomic_write_text(target, "first")
    assert target.read_text() == "first"
    atomic_write_bytes(target, b"second")
    assert target.read_bytes() == b"second"
    with pytest.raises(TypeError):
        atomic_write_bytes(target, "not bytes")  # type: ignore[arg-type]
    assert target.read_bytes() == b"second"
    assert [p.name for p in target.parent.iterdir()] == ["b.txt"]
    # permissions of a plain open(), not mkstemp's 0600
    assert target.stat().st_mode & 0o777 == 0o666 & ~imageio._UMASK


def test_other_modes(tmp_path: Path) -> None:
    rgb = _rgb(5, 7)
    Image.fromarray(rgb).convert("CMYK").save(tmp_path / "c.tiff")
    expect = np.asarray(Image.fromarray(rgb).convert("CMYK").convert("RGB"))
    np.testing.assert_array_equal(read_image(tmp_path / "c.tiff"), expect)
    # float images: values in [0, 1] are scaled by 255 (rounded), others clipped to 0..255
    Image.fromarray(np.array([[0.0, 0.5, 1.0]] * 2, np.float32)).save(tmp_path / "f.tiff")
    np.testing.assert_array_equal(read_image(tmp_path / "f.tiff")[0, :, 1], [0, 128, 255])
    Image.fromarray(np.array([[-3.0, 100.4, 900.0]] * 2, np.float32)).save(tmp_path / "g.tiff")
    np.testing.assert_array_equal(read_image(tmp_path / "g.tiff")[0, :, 0], [0, 100, 255])
    # 32-bit integer images are read as 16-bit data (clipped to 0..65535, high byte kept)
    Image.fromarray(np.array([[-5, 512, 70000]] * 2, np.int32)).save(tmp_path / "i.tiff")
    assert Image.open(tmp_path / "i.tiff").mode == "I"
    np.testing.assert_array_equal(read_image(tmp_path / "i.tiff")[0, :, 2], [0, 2, 255])


def test_label_png_palette_is_given_colours_then_defaults() -> None:
    """The PLTE of encode_label_png: the given colours (at most 256) then default_palette; the
    cached defaults are never changed by a call."""
    import io

    labels = np.arange(12, dtype=np.uint8).reshape(3, 4)
    defaults = [v for rgb in default_palette(256) for v in rgb]
    long = [(i % 256, (7 * i) % 256, (13 * i) % 256) for i in range(300)]
    cases = [(None, defaults), ([], defaults),
             ([[9, 8, 7], np.array([1, 2, 3])], [9, 8, 7, 1, 2, 3] + defaults[6:]),
             (long, [v for rgb in long[:256] for v in rgb])]
    for palette, expect in cases + cases[:1]:          # None again: defaults untouched
        im = Image.open(io.BytesIO(imageio.encode_label_png(labels, palette)))
        assert im.mode == "P" and im.getpalette() == expect
        np.testing.assert_array_equal(np.asarray(im), labels)


def _pillow_rgb(path: Path) -> np.ndarray:
    """Reference decode: Pillow alone (the slow path read_image takes for other formats)."""
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def test_fast_png_path_matches_pillow(tmp_path: Path) -> None:
    """Plain 8-bit RGB/grayscale PNGs are decoded by OpenCV: same pixels as Pillow, for
    photo-like content, every zlib level, filters and odd sizes; other PNGs go to Pillow."""
    rng = np.random.default_rng(3)
    smooth = np.clip(np.cumsum(rng.normal(0, 6, (37, 53, 3)), axis=1) + 128, 0, 255).astype(np.uint8)
    cases = {"rgb_noise.png": (Image.fromarray(_rgb(31, 45)), {}),
             "rgb_smooth_l9.png": (Image.fromarray(smooth), {"compress_level": 9}),
             "rgb_smooth_l0.png": (Image.fromarray(smooth), {"compress_level": 0}),
             "gray.png": (Image.fromarray(smooth[:, :, 0]), {}),
             "gamma.png": (Image.fromarray(smooth), {"gamma": 0.45})}  # gAMA ignored by both
    for name, (im, kw) in cases.items():
        if name == "gamma.png":
            from PIL import PngImagePlugin
            info = PngImagePlugin.PngInfo()
            info.add(b"gAMA", struct.pack(">I", 45455))
            im.save(tmp_path / name, pnginfo=info)
        else:
            im.save(tmp_path / name, **kw)
        with Image.open(tmp_path / name) as opened:
            assert imageio._fast_png(opened), name
        np.testing.assert_array_equal(read_image(tmp_path / name), _pillow_rgb(tmp_path / name),
                                      err_msg=name)
    # palette, alpha and transparency keys are not plain: Pillow handles them
    Image.fromarray(_rgb(8, 8)).convert("P").save(tmp_path / "pal.png")
    Image.fromarray(np.dstack([_rgb(8, 8), _rgb(8, 8)[:, :, :1]])).save(tmp_path / "rgba.png")
    for name in ("pal.png", "rgba.png"):
        with Image.open(tmp_path / name) as opened:
            assert not imageio._fast_png(opened), name


def test_fast_png_path_refuses_corrupt_data(tmp_path: Path) -> None:
    """A flipped byte inside the compressed pixel data (CRC mismatch) is an error, never a
    silently damaged image."""
    path = tmp_path / "c.png"
    Image.fromarray(_rgb(64, 64)).save(path)
    data = bytearray(path.read_bytes())
    idat = data.index(b"IDAT")
    data[idat + 40] ^= 0xFF
    path.write_bytes(bytes(data))
    _assert_read_error(path, "truncated or corrupt")
