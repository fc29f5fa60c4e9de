"""The dataset contract: reading and validating a dataset folder.

The records and the :class:`Dataset` are in :mod:`spml_deploy.data.dataset.records`, the parsing
of ``annotations.json`` in :mod:`spml_deploy.data.dataset.annotations`, :func:`load_dataset`
(sizes, records, label maps, splits) in :mod:`spml_deploy.data.dataset.loader`.

::

    DATASET/
      images/              RGB images (png, jpg, bmp, webp, tiff; grayscale, RGBA, 16-bit and
                           EXIF-rotated images are accepted, see spml_deploy.data.imageio)
      annotations.json     weak annotations, COCO-style (always required; may hold no annotations)
      masks/<stem>.png     optional full label maps: uint8 class ids, 255 = ignore
      sparse/<stem>.png    optional sparse label maps: class ids, 255 = unlabeled
      splits/<name>.txt    optional lists of image stems, one per line (train.txt, val.txt)

``annotations.json``::

    {"categories": [{"id": 0, "name": "background"}, {"id": 1, "name": "cat"}],
     "images": [{"id": 1, "file_name": "0001.png", "width": 128, "height": 96, "tags": [1]}],
     "annotations": [
       {"image_id": 1, "category_id": 1, "bbox": [x, y, w, h]},
       {"image_id": 1, "category_id": 1, "point": [x, y]},
       {"image_id": 1, "category_id": 0, "scribble": [[x, y], [x, y], ...]}]}

Rules checked by :func:`load_dataset` (each failure is a :class:`DatasetError` naming the file,
the entry and the fix):

* Category ids are exactly ``0..C-1`` (any order in the file), ``0`` is background, ``C >= 2``,
  names are unique. Ids are JSON integers.
* Image ids are unique integers; ``file_name`` is a relative path under ``images/`` (subfolders
  allowed, no ``..``). The *stem* (file name without folders and extension) must be unique: it
  names ``masks/<stem>.png``, ``sparse/<stem>.png``, split entries and prediction files. A mask
  at ``masks/<file_name without extension>.png`` (mirroring subfolders) is also found.
* ``width``/``height`` are optional; when absent they are read from the image header. With
  ``check_files`` a declared size must equal the image's size after EXIF orientation.
* Coordinates are pixels of the EXIF-oriented image, ``x`` = column, ``y`` = row, floats
  allowed. A point (and every scribble vertex) names a pixel centre:
  ``0 <= x <= width - 1`` and ``0 <= y <= height - 1``. A box ``[x, y, w, h]`` is in pixel-edge
  coordinates (COCO): ``0 <= x``, ``0 <= y``, ``w > 0``, ``h > 0``, ``x + w <= width``,
  ``y + h <= height``. A tolerance of ``COORD_TOL`` pixels absorbs float rounding.
* Background (category 0) may be used by points and scribbles, never by boxes or tags.
  A scribble has at least 2 vertices. Each annotation has exactly one of bbox/point/scribble.
* ``tags`` (foreground class ids present in the image) are optional. When absent they are
  derived from the image's annotations (the foreground categories of its boxes, points and
  scribbles); an image with neither has no tags (``tags_source == "none"``). Given tags must
  include the category of every foreground annotation of the image.
* Masks and sparse maps must have their image's size and hold only ids ``< C`` or 255.
* Split files list stems (or file_name, with or without extension); unknown or repeated
  entries are errors. ``all`` is reserved: it names every image.
"""
from __future__ import annotations

from spml_deploy.data.dataset.loader import load_dataset
from spml_deploy.data.dataset.records import (COORD_TOL, KINDS, Box, Category, Dataset, ImageRecord,
                                              Point, Scribble, load_mask, load_sparse)

__all__ = [
    "KINDS", "COORD_TOL", "Category", "Box", "Point", "Scribble", "ImageRecord", "Dataset",
    "load_dataset", "load_mask", "load_sparse",
]
