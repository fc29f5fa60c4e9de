"""The built-in scenes drawn: object scenes (default) and stick figures (parts mode), with
their weak annotations.

Design of the object scenes (default)
-------------------------------------
Eight foreground classes, built so that **colour alone cannot separate them**: every instance
draws its colours from one shared distribution (random hue, saturation 0.25-0.95, value
0.3-0.95), whatever its class. Classes differ by shape, texture and context, and each class has
a partner it is confused with unless one of those cues is used:

======== ========= ========= ========= ===============================================
class    shape     texture   context   told apart from its partner by
======== ========= ========= ========= ===============================================
disc     disc      stripes   anywhere  shape (vs square), texture (vs pebble)
square   square    stripes   anywhere  shape (vs disc)
pebble   disc      speckle   anywhere  texture (vs disc), shape (vs ring)
triangle triangle  checker   anywhere  shape (vs star)
star     star      checker   anywhere  shape (vs triangle)
ring     annulus   speckle   anywhere  shape (vs pebble); its hole shows what lies behind
balloon  ellipse   shaded    sky only  context (vs boulder): same shape and texture
boulder  ellipse   shaded    ground    context (vs balloon)
======== ========= ========= ========= ===============================================

Stripes and checkers are two-colour patterns at a random angle and period; speckle is a patch
of a real grey-level texture (brick, grass, gravel, moon surface from scikit-image's bundled
images) mixing two colours; shaded is a single colour lit like a sphere with a highlight.

The background is class 0 and not uniform: a sky (vertical colour gradient with soft clouds)
above a wavy horizon and a ground below it, made of a random crop, at a random zoom, of a real
texture tinted with two colours or of a real photograph (coffee, astronaut, rocket, cat,
immunohistochemistry). Zero to two clutter blobs (irregular shapes wearing the objects'
textures) are painted on the background and stay class 0, so texture alone is not enough
either. Three to seven objects per image, radius 6-20 % of the image side drawn log-uniformly
(scale changes), random rotation, random depth order: later objects occlude earlier ones and
the masks keep only visible pixels. Objects left with fewer than ``min_area`` visible pixels are
removed and the scene is redrawn without them. Finally: an illumination gradient, a colour
cast, Gaussian blur (sigma 0.3-1.0 px at 128 px) and Gaussian noise (sigma 1-3.5 % of range).

Parts mode (``--parts``)
------------------------
Modelled on the paper's DensePose setting: one to three stick figures per image whose parts all
share one appearance (one texture field per figure, so part boundaries are invisible) and are
told apart only by their layout. Eight part classes: head, torso, upper_arm, forearm, hand,
thigh, shin, foot. Left and right limbs share a class (a flip then needs no label swap; the
paper's DensePose set distinguishes them). Figures have random joint angles (arms anywhere,
elbows and knees bent, feet pointing the way the figure faces), random scale (45-95 % of the
image side), a rotation of up to 35 degrees, a random choice of which arm and leg are behind
the torso, and may overlap each other. Clutter poles and balls wearing figure textures are
class 0. Parts occluded down to fewer than ``min_area`` visible pixels keep their ground truth
and box but get no point or scribble.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import cv2
import numpy as np

from spml_deploy.data.synth.draw import (Drawer, _capsule, _colour, _disc, _mix, _patch, _polygon,
                                         _shape, _texture, texture_bank)
from spml_deploy.data.weaken import annotate_instance_map, derive_tags

SCENE_CLASSES = ("background", "disc", "square", "pebble", "triangle", "star", "ring",
                 "balloon", "boulder")
PART_CLASSES = ("background", "head", "torso", "upper_arm", "forearm", "hand", "thigh", "shin",
                "foot")
# class id -> (shape, texture, context)
SCENE_DESIGN = {
    1: ("disc", "stripes", "any"),
    2: ("square", "stripes", "any"),
    3: ("disc", "speckle", "any"),
    4: ("triangle", "checker", "any"),
    5: ("star", "checker", "any"),
    6: ("ring", "speckle", "any"),
    7: ("ellipse", "shaded", "sky"),
    8: ("ellipse", "shaded", "ground"),
}
OBJECT_TEXTURES = ("stripes", "checker", "speckle", "shaded")


# --------------------------------------------------------------------------------------------
# scenes


@dataclass
class Piece:
    """One drawn instance: its class, its drawer, and the group (figure) whose texture it wears."""

    cls: int
    draw: Drawer
    group: int


@dataclass
class Scene:
    """A rendered scene.

    ``image``: height x width x 3 uint8 RGB; ``mask``: height x width uint8 class ids;
    ``instances``: height x width int32 instance ids (0 = background, k = ``classes[k - 1]``),
    visible pixels only; ``sky``: height x width bool, the sky region (context);
    ``min_area``: instances with fewer visible pixels get no point or scribble; ``groups``:
    the figure (parts mode) or object each instance belongs to; ``drawn_area``: pixels each
    instance would cover if nothing occluded it.
    """

    image: np.ndarray
    mask: np.ndarray
    instances: np.ndarray
    classes: list[int]
    sky: np.ndarray
    min_area: int
    parts: bool = False
    groups: list[int] = field(default_factory=list)
    drawn_area: list[int] = field(default_factory=list)


def min_visible_area(size: int) -> int:
    """Fewest visible pixels an instance needs for a point and a scribble (and, in object
    scenes, to be kept at all)."""
    return max(9, round(0.001 * size * size))


def render_scene(size: int, rng: np.random.Generator, parts: bool = False) -> Scene:
    """Render one ``size`` x ``size`` scene (object scene, or figures when ``parts``)."""
    S = size
    image, sky, horizon = _background(S, rng)
    _clutter(image, S, rng, parts)
    pieces = _figures(S, rng) if parts else _objects(S, rng, horizon)
    min_area = min_visible_area(S)
    ids, drawn = _paint(S, pieces)
    if not parts:       # drop objects occluded down to a sliver, redraw without them
        area = np.bincount(ids.ravel(), minlength=len(pieces) + 1)[1:]
        if (area < min_area).any():
            pieces = [p for p, a in zip(pieces, area) if a >= min_area]
            ids, drawn = _paint(S, pieces)
    # appearance: one texture per group (an object, or a whole figure), on its visible pixels
    groups = sorted({p.group for p in pieces})
    gid = np.zeros(len(pieces) + 1, np.int32)
    gid[1:] = [p.group + 1 for p in pieces]
    gmap = gid[ids]
    for g in groups:
        vis = gmap == g + 1
        rows = np.flatnonzero(vis.any(1))
        if len(rows) == 0:
            continue
        cols = np.flatnonzero(vis.any(0))
        y0, y1, x0, x1 = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
        if parts:
            kind, scale = _figure_texture(rng), max(y1 - y0, x1 - x0) / 5
        else:
            cls = next(p.cls for p in pieces if p.group == g)
            kind, scale = SCENE_DESIGN[cls][1], max(y1 - y0, x1 - x0) / 2
        _paste(image[y0:y1, x0:x1], _texture(kind, y1 - y0, x1 - x0, scale, rng),
               vis[y0:y1, x0:x1].view(np.uint8))
    image = _photometric(image, S, rng)
    classes = [p.cls for p in pieces]
    lut = np.array([0] + classes, np.uint8)
    return Scene(image=image, mask=lut[ids], instances=ids, classes=classes, sky=sky,
                 min_area=min_area, parts=parts, groups=[p.group for p in pieces],
                 drawn_area=drawn)


def _paste(dst: np.ndarray, src: np.ndarray, mask: np.ndarray) -> None:
    """``dst[mask] = src[mask]`` in place (height x width x 3 float32; mask uint8)."""
    assert dst.dtype == src.dtype == np.float32 and dst.shape == src.shape
    out = cv2.copyTo(src, mask, dst)
    assert np.shares_memory(out, dst), "cv2.copyTo did not write in place"


def _figure_texture(rng: np.random.Generator) -> str:
    """The appearance of a figure (shaded = plain colour lit like a sphere)."""
    return ("stripes", "checker", "speckle", "shaded", "shaded")[int(rng.integers(5))]


def _paint(S: int, pieces: list[Piece]) -> tuple[np.ndarray, list[int]]:
    """(instance id map height x width int32: piece k (1-based) where it is visible,
    pixels each piece covers on its own, before occlusion)."""
    ids = np.zeros((S, S), np.int32)
    canvas = np.zeros((S, S), np.uint8)
    drawn = []
    for k, p in enumerate(pieces, 1):
        canvas[:] = 0
        p.draw(canvas)
        ids[canvas > 0] = k
        drawn.append(cv2.countNonZero(canvas))
    return ids, drawn


def _background(S: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(image height x width x 3 float32, sky mask, horizon row per column)."""
    x = np.arange(S, dtype=np.float32)
    horizon = (S * rng.uniform(0.3, 0.6)
               + S * rng.uniform(0, 0.08) * np.sin(x * (2 * math.pi / (S * rng.uniform(0.6, 2)))
                                                   + rng.uniform(0, 6.3))).astype(np.float32)
    yy = np.arange(S, dtype=np.float32)[:, None]
    sky = yy < horizon[None, :]
    # sky: pastel vertical gradient with soft clouds
    top, low = 0.5 + 0.5 * _colour(rng), 0.35 + 0.65 * _colour(rng)
    t = np.clip(yy / np.maximum(horizon[None, :], 1), 0, 1)
    sky_img = _mix(t, low, top)
    clouds = cv2.resize(rng.random((4, 6), dtype=np.float32), (S, S), interpolation=cv2.INTER_CUBIC)
    cover = np.clip((clouds - np.float32(rng.uniform(0.4, 0.8))) * 3, 0, 1)
    sky_img += (0.95 - sky_img) * cv2.merge([cover, cover, cover])
    # ground: tinted real texture or a real photograph
    grey, photos = texture_bank()
    if rng.random() < 0.6:
        g = _patch(grey[int(rng.integers(len(grey)))], S, S, rng, (0.5, 2.0))
        t = np.clip(0.5 + np.float32(rng.uniform(0.15, 0.35)) * g, 0, 1)
        ground = _mix(t, _colour(rng), _colour(rng))
    else:
        ground = _patch(photos[int(rng.integers(len(photos)))], S, S, rng, (0.7, 2.5))
        ground = cv2.multiply(ground, (*(0.6 + 0.6 * _colour(rng)).tolist(), 0.0))
    image = cv2.copyTo(sky_img, sky.view(np.uint8), ground)
    return image, sky, horizon


def _clutter(image: np.ndarray, S: int, rng: np.random.Generator, parts: bool) -> None:
    """Paint 0-2 background-class distractors wearing object or figure textures, in place."""
    for _ in range(int(rng.integers(0, 3))):
        r = S * math.exp(rng.uniform(math.log(0.05), math.log(0.15)))
        cx, cy = rng.uniform(0, S), rng.uniform(0, S)
        if parts and rng.random() < 0.6:
            ang = rng.uniform(0, math.pi)
            d = np.array([math.cos(ang), math.sin(ang)]) * r * 1.5
            draw = _capsule(np.array([cx, cy]) - d, np.array([cx, cy]) + d,
                            S * rng.uniform(0.03, 0.06))
            kind = _figure_texture(rng)
        else:
            draw = _shape("blob", cx, cy, r, rng)
            kind = OBJECT_TEXTURES[int(rng.integers(len(OBJECT_TEXTURES)))]
        canvas = np.zeros((S, S), np.uint8)
        draw(canvas)
        x, y, w, h = cv2.boundingRect(canvas)
        if w > 0:
            _paste(image[y:y + h, x:x + w], _texture(kind, h, w, r, rng),
                   canvas[y:y + h, x:x + w])


def _objects(S: int, rng: np.random.Generator, horizon: np.ndarray) -> list[Piece]:
    """3-7 objects of random class, size, position and depth order (context rules applied)."""
    pieces: list[Piece] = []
    for k in range(int(rng.integers(3, 8))):
        r = S * math.exp(rng.uniform(math.log(0.06), math.log(0.2)))
        cx = rng.uniform(0, S)
        hy = float(horizon[min(S - 1, max(0, int(cx)))])
        cls = int(rng.integers(1, 9))
        context = SCENE_DESIGN[cls][2]
        if context == "sky" and hy - 0.8 * r <= 0.3 * r:
            cls, context = 8, "ground"           # no room in the sky here: a boulder instead
        if context == "sky":
            cy = rng.uniform(0.3 * r, hy - 0.8 * r)
        elif context == "ground":
            cy = rng.uniform(hy + 0.3 * r, max(hy + 0.3 * r, S + 0.2 * r))
        else:
            cy = rng.uniform(0, S)
        pieces.append(Piece(cls, _shape(SCENE_DESIGN[cls][0], cx, cy, r, rng), k))
    return pieces


def _figures(S: int, rng: np.random.Generator) -> list[Piece]:
    """1-3 stick figures; each a list of parts in drawing order (back limbs first)."""
    pieces: list[Piece] = []
    for g in range(int(rng.integers(1, 4))):
        H = S * rng.uniform(0.45, 0.95)
        pelvis = np.array([rng.uniform(0.15, 0.85) * S, rng.uniform(0.45, 0.75) * S])
        pieces += _figure(pelvis, H, rng.uniform(-0.6, 0.6), rng, g)
    return pieces


def _figure(pelvis: np.ndarray, H: float, tilt: float, rng: np.random.Generator,
            g: int) -> list[Piece]:
    """Parts of one figure of height ``H`` px, pelvis at ``pelvis`` (x, y), tilted ``tilt`` rad."""
    up = np.array([math.sin(tilt), -math.cos(tilt)])
    right = np.array([-up[1], up[0]])
    facing = 1.0 if rng.random() < 0.5 else -1.0

    def unit(angle: float) -> np.ndarray:      # angle from "down", counter-clockwise
        return -up * math.cos(angle) + right * math.sin(angle)

    neck = pelvis + up * 0.30 * H
    sw, hw = 0.10 * H, 0.075 * H
    torso = np.stack([neck - right * sw, neck + right * sw, pelvis + right * hw,
                      pelvis - right * hw])
    head_r = 0.075 * H
    head = neck + up * (0.015 * H + head_r)
    limbs: dict[str, list[Piece]] = {}
    for side in (-1.0, 1.0):
        shoulder = neck + right * side * 0.085 * H - up * 0.02 * H
        a1 = side * rng.uniform(-0.35, 2.6)
        elbow = shoulder + unit(a1) * 0.15 * H
        a2 = a1 + side * rng.uniform(-0.3, 2.3)
        wrist = elbow + unit(a2) * 0.14 * H
        hand = wrist + unit(a2) * 0.03 * H
        hip = pelvis + right * side * 0.045 * H
        b1 = side * rng.uniform(-0.25, 0.6) + facing * rng.uniform(0, 0.5)
        knee = hip + unit(b1) * 0.22 * H
        b2 = b1 - facing * rng.uniform(0, 1.6)
        ankle = knee + unit(b2) * 0.21 * H
        toe = ankle + unit(b2 + facing * 1.45) * 0.075 * H
        limbs[f"arm{side}"] = [Piece(3, _capsule(shoulder, elbow, 0.06 * H), g),
                               Piece(4, _capsule(elbow, wrist, 0.05 * H), g),
                               Piece(5, _disc(hand[0], hand[1], 0.035 * H), g)]
        limbs[f"leg{side}"] = [Piece(6, _capsule(hip, knee, 0.085 * H), g),
                               Piece(7, _capsule(knee, ankle, 0.065 * H), g),
                               Piece(8, _capsule(ankle, toe, 0.045 * H), g)]
    back_arm, back_leg = (-1.0, 1.0) if rng.random() < 0.5 else (1.0, -1.0)
    return (limbs[f"arm{back_arm}"] + limbs[f"leg{back_leg}"]
            + [Piece(2, _polygon(torso), g), Piece(1, _disc(head[0], head[1], head_r), g)]
            + limbs[f"leg{-back_leg}"] + limbs[f"arm{-back_arm}"])


def _photometric(image: np.ndarray, S: int, rng: np.random.Generator) -> np.ndarray:
    """Illumination gradient, colour cast, blur and noise; returns uint8."""
    phi = rng.uniform(0, 2 * math.pi)
    ramp = (np.arange(S, dtype=np.float32) / S - 0.5)
    gain = 1 + np.float32(rng.uniform(0.15, 0.5)) * (ramp[None, :] * np.float32(math.cos(phi))
                                                      + ramp[:, None] * np.float32(math.sin(phi)))
    cast = rng.uniform(0.9, 1.1, 3).astype(np.float32)
    image = image * cv2.merge([gain * cast[i] for i in range(3)])
    sigma = rng.uniform(0.3, 1.0) * S / 128
    image = cv2.GaussianBlur(image, (0, 0), sigma)
    image += rng.standard_normal(image.shape, dtype=np.float32) * np.float32(
        rng.uniform(0.01, 0.035))
    return cv2.multiply(image, (255.0, 255.0, 255.0, 0.0), dtype=cv2.CV_8U)  # rounds, saturates


def scene_annotations(scene: Scene, rng: np.random.Generator,
                      n_background: int = 2) -> tuple[list[int], list[dict[str, Any]]]:
    """(tags, annotation dicts without image_id) of a scene, from its true instance maps.

    Boxes for every visible instance; points and scribbles for instances with at least
    ``scene.min_area`` visible pixels; ``n_background`` background points and strokes. Same
    derivation as :mod:`spml_deploy.data.weaken` applies to user datasets.
    """
    anns = annotate_instance_map(scene.instances, scene.classes, scene.mask, rng,
                                 min_area=scene.min_area, n_background=n_background)
    return derive_tags(scene.mask), anns
