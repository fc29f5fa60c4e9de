"""The supervision kinds: which annotation trains a model, and what follows from it.

One row per kind (:data:`SUPERVISION_KINDS`); everything that lists the kinds reads them from
here: the command-line choices (``train --supervision``, ``data weaken --kind``), the presets'
check, the dataset contract (which record field holds the annotation), ``data weaken`` (which
key its annotations.json entries carry), the weak-label dispatch and the training path.

Columns:

* ``name``: the ``--supervision`` value.
* ``field``: the :class:`~spml_deploy.data.dataset.ImageRecord` attribute holding it.
* ``sources``: the dataset's annotation sources (``Dataset.annotation_kinds()`` keys) that
  provide it; a sparse label PNG serves both scribbles and points.
* ``json_key``: the key of its annotations.json entries (None: not an annotation entry).
* ``gives``: what it labels: ``pixels`` (a label map directly), ``boxes`` or ``tags`` (image
  level; pixel labels come from class activation maps).
* ``derivable``: ``data weaken`` can derive it from full masks.
* ``phrase``: how messages name it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

__all__ = ["SupervisionKind", "SUPERVISION_KINDS", "SUPERVISIONS", "WEAK_KINDS", "kind",
           "needs_cams", "kinds_of", "preferred"]


@dataclass(frozen=True)
class SupervisionKind:
    """One supervision kind (see the module docstring for the columns)."""

    name: str
    field: str
    sources: tuple[str, ...]
    json_key: str | None
    gives: str
    derivable: bool
    phrase: str

    @property
    def needs_cams(self) -> bool:
        """Training first fits the CAM classifier to turn image-level labels into pixels."""
        return self.gives != "pixels"

    @property
    def image_level(self) -> bool:
        """Image-level labels only: the pseudo labels come from Algorithm 2 (CAM walk and kNN
        propagation across images); every other kind takes Algorithm 1 (spec 7.4)."""
        return self.gives == "tags"


SUPERVISION_KINDS: tuple[SupervisionKind, ...] = (
    SupervisionKind("full", "mask_path", ("masks",), None, "pixels", False, "full masks"),
    SupervisionKind("scribbles", "scribbles", ("scribbles", "sparse"), "scribble", "pixels", True,
                    "scribbles"),
    SupervisionKind("points", "points", ("points", "sparse"), "point", "pixels", True, "points"),
    SupervisionKind("boxes", "boxes", ("boxes",), "bbox", "boxes", True, "boxes"),
    SupervisionKind("tags", "tags", ("tags",), None, "tags", True, "tags"),
)

_BY_NAME = {k.name: k for k in SUPERVISION_KINDS}
SUPERVISIONS: tuple[str, ...] = tuple(_BY_NAME)
# the kinds ``data weaken`` derives from masks
WEAK_KINDS: tuple[str, ...] = tuple(k.name for k in SUPERVISION_KINDS if k.derivable)


def kind(name: str) -> SupervisionKind:
    """The row of a kind; :class:`KeyError` naming the known kinds for another name."""
    try:
        return _BY_NAME[name]
    except KeyError:
        raise KeyError(f"unknown supervision kind {name!r}; kinds: "
                       f"{', '.join(SUPERVISIONS)}") from None


def needs_cams(name: str) -> bool:
    """Whether training with kind ``name`` starts with the CAM classifier (boxes, tags)."""
    return kind(name).needs_cams


def kinds_of(sources: Iterable[str]) -> tuple[str, ...]:
    """The supervision kinds that the given annotation sources provide, in table order."""
    have = set(sources)
    return tuple(k.name for k in SUPERVISION_KINDS if have.intersection(k.sources))


def preferred(names: Iterable[str]) -> list[str]:
    """``names`` in the order a message suggests them: the weak kinds first (table order),
    full masks last."""
    have = set(names)
    return [k.name for k in SUPERVISION_KINDS if k.derivable and k.name in have] + \
           [k.name for k in SUPERVISION_KINDS if not k.derivable and k.name in have]
