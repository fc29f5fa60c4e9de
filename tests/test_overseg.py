"""Over-segmentation (< 256 regions, merge rule against a naive oracle) and its on-disk cache."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage
from skimage import data

from spml_deploy.errors import ConfigError
from spml_deploy.training import overseg as ov


def _is_refinement(fine: np.ndarray, coarse: np.ndarray) -> bool:
    """Every region of ``fine`` lies inside one region of ``coarse``."""
    pairs = np.unique(np.stack([fine.ravel().astype(np.int64), coarse.ravel().astype(np.int64)]), axis=1)
    return len(np.unique(pairs[0])) == pairs.shape[1]


@pytest.mark.parametrize("name,method", [("gravel", "felzenszwalb"), ("astronaut", "slic")])
def test_textured_512_image_gets_fewer_than_256_contiguous_regions(name, method):
    img = getattr(data, name)()
    assert img.shape[:2] == (512, 512)
    regions = ov.oversegment(img, method)
    assert regions.dtype == np.uint8 and regions.shape == (512, 512)
    n = int(regions.max()) + 1
    assert n <= 256
    assert np.array_equal(np.unique(regions), np.arange(n))       # contiguous ids
    assert n >= 64                                                 # not degenerate either


def test_felzenszwalb_raw_output_is_merged_down_and_regions_stay_connected():
    from skimage import segmentation

    img = data.gravel()[:192, :192]
    img3 = np.repeat(img[:, :, None], 3, axis=2)
    regions = ov.oversegment(img, "felzenszwalb", max_regions=40)
    raw = segmentation.felzenszwalb(img3, channel_axis=-1,
                                    **ov.method_params("felzenszwalb", 192, 192, 40))
    assert raw.max() + 1 > 40                                      # the merge step was needed
    assert int(regions.max()) + 1 <= 40
    assert _is_refinement(raw, regions)
    eight = np.ones((3, 3), int)      # felzenszwalb's graph is 8-connected
    for r in range(int(raw.max()) + 1):
        assert ndimage.label(raw == r, eight)[1] == 1
    for r in range(int(regions.max()) + 1):
        assert ndimage.label(regions == r, eight)[1] == 1


def _merge_oracle(labels: np.ndarray, image: np.ndarray, max_regions: int) -> np.ndarray:
    """Naive merge: recompute sizes, mean colours and borders from the label map at every step."""
    lab = np.unique(labels, return_inverse=True)[1].reshape(labels.shape)
    img = image.astype(np.float64)
    while len(np.unique(lab)) > max_regions:
        ids = np.unique(lab)
        def border(a, b):
            h = ((lab[:, :-1] == a) & (lab[:, 1:] == b)) | ((lab[:, :-1] == b) & (lab[:, 1:] == a))
            v = ((lab[:-1] == a) & (lab[1:] == b)) | ((lab[:-1] == b) & (lab[1:] == a))
            return int(h.sum() + v.sum())
        sizes = {i: int((lab == i).sum()) for i in ids}
        r = min(ids, key=lambda i: (sizes[i], i))
        mean_r = img[lab == r].mean(0)
        nbrs = [q for q in ids if q != r and border(r, q) > 0]
        t = min(nbrs, key=lambda q: (float(((img[lab == q].mean(0) - mean_r) ** 2).sum()),
                                     -border(r, q), q))
        lab[lab == r] = t
    return np.unique(lab, return_inverse=True)[1].reshape(labels.shape).astype(np.uint8)


def test_merge_matches_naive_oracle():
    rng = np.random.default_rng(0)
    # 30 random blobs on a 24 x 24 grid (piecewise constant colours + noise: no exact ties)
    seeds = rng.integers(0, 24, size=(30, 2))
    yy, xx = np.mgrid[:24, :24]
    d = (yy[..., None] - seeds[:, 0]) ** 2 + (xx[..., None] - seeds[:, 1]) ** 2
    labels = d.argmin(-1) * 7 + 3                                  # arbitrary, non-contiguous ids
    colours = rng.uniform(0, 255, size=(labels.max() + 1, 3))
    image = colours[labels] + rng.normal(0, 3, size=(24, 24, 3))
    got = ov.merge_regions(labels, image, max_regions=9)
    np.testing.assert_array_equal(got, _merge_oracle(labels, image, 9))
    assert int(got.max()) + 1 == 9 and _is_refinement(labels, got)
    # under the limit: only relabelled
    same = ov.merge_regions(labels, image, max_regions=256)
    assert _is_refinement(labels, same) and _is_refinement(same, labels)


def test_bad_arguments():
    with pytest.raises(ConfigError, match="unknown over-segmentation method"):
        ov.oversegment(np.zeros((8, 8, 3), np.uint8), "hed")
    with pytest.raises(ConfigError, match="1..256"):
        ov.oversegment(np.zeros((8, 8, 3), np.uint8), max_regions=300)


# ---------------------------------------------------------------------------------------------
# cache


@pytest.fixture
def image_file(tmp_path: Path) -> Path:
    img = data.astronaut()[::4, ::4].copy()                       # 128 x 128
    path = tmp_path / "img" / "a b.png"
    path.parent.mkdir()
    Image.fromarray(img).save(path)
    return path


def _counting(monkeypatch):
    calls = []
    real = ov.oversegment

    def counted(*a, **k):
        calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr(ov, "oversegment", counted)
    return calls


def test_cache_hit_does_not_recompute(tmp_path, image_file, monkeypatch):
    calls = _counting(monkeypatch)
    cache = ov.OversegCache(tmp_path / "cache")
    first = cache.get(image_file)
    assert len(calls) == 1 and cache.cache_file(image_file).is_file()
    again = ov.OversegCache(tmp_path / "cache").get(image_file)     # fresh object, same folder
    assert len(calls) == 1
    np.testing.assert_array_equal(first, again)
    np.testing.assert_array_equal(first, ov.oversegment(np.asarray(Image.open(image_file))))
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [cache.cache_file(image_file).name]
    # another method is another entry
    ov.OversegCache(tmp_path / "cache", method="slic").get(image_file)
    assert len(calls) == 3


def test_corrupt_or_stale_cache_is_recomputed(tmp_path, image_file, monkeypatch):
    cache = ov.OversegCache(tmp_path / "cache")
    good = cache.get(image_file)
    file = cache.cache_file(image_file)
    calls = _counting(monkeypatch)
    file.write_bytes(b"not an npz at all")
    np.testing.assert_array_equal(cache.get(image_file), good)
    assert len(calls) == 1
    np.savez(file, region=np.zeros((5, 5), np.uint8))              # wrong shape for the image
    np.testing.assert_array_equal(cache.get(image_file, np.asarray(Image.open(image_file))), good)
    assert len(calls) == 2
    # editing the image (new mtime) changes the key
    st = image_file.stat()
    os.utime(image_file, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert cache.cache_file(image_file) != file
    cache.get(image_file)
    assert len(calls) == 3


def test_precompute_with_process_pool(tmp_path):
    paths = []
    for i in range(3):
        p = tmp_path / f"{i}.png"
        Image.fromarray(data.chelsea()[i * 20:i * 20 + 64, :64]).save(p)
        paths.append(p)
    out = ov.precompute_overseg(paths, tmp_path / "c", workers=2, progress=False)
    assert out == {"computed": 3, "cached": 0}
    out = ov.precompute_overseg(paths, tmp_path / "c", workers=2, progress=False)
    assert out == {"computed": 0, "cached": 3}
    cache = ov.OversegCache(tmp_path / "c")
    for p in paths:
        assert cache._load(cache.cache_file(p), (64, 64)) is not None
