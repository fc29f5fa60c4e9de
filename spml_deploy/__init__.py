"""spml-deploy: SPML weakly supervised semantic segmentation, from training to deployment.

The public Python API (what the command line itself calls)::

    import spml_deploy as spml

    pipe = spml.load_pipeline("runs/pts")                 # a run folder or an exported bundle
    labels = pipe.predict([image])[0].labels              # RGB uint8 [H, W, 3] -> uint8 [H, W]

    with spml.Retriever("index/") as r:                   # an index built by 'spml-deploy index'
        hits, query = r.query(image, point=(120, 80), k=10)

    engine = spml.Engine(spml.load_backend("runs/pts"), pp)   # images -> embeddings, logits

Names are imported on first use, so ``import spml_deploy`` (and ``spml-deploy --help``) stays
light: torch, FAISS and the stage packages load only when a name that needs them is used.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> module that defines it
_API = {
    "load_pipeline": "spml_deploy.engine.pipeline",
    "Pipeline": "spml_deploy.engine.pipeline",
    "PipelineOptions": "spml_deploy.engine.pipeline",
    "Prediction": "spml_deploy.engine.pipeline",
    "Engine": "spml_deploy.engine.forward",
    "Forward": "spml_deploy.engine.forward",
    "load_backend": "spml_deploy.engine.backends",
    "read_manifest": "spml_deploy.artifacts",
    "Manifest": "spml_deploy.artifacts",
    "SpmlError": "spml_deploy.errors",
    "Retriever": "spml_deploy.serving.retrieval",
    "Hit": "spml_deploy.serving.retrieval",
    "run_segment_job": "spml_deploy.serving.segment",
    "train": "spml_deploy.training.train",
    "export_bundle": "spml_deploy.export.bundle",
}
__all__ = ["__version__", *_API]

if TYPE_CHECKING:  # for type checkers and IDEs; at run time names load lazily (below)
    from spml_deploy.artifacts import Manifest, read_manifest  # noqa: F401
    from spml_deploy.engine.backends import load_backend  # noqa: F401
    from spml_deploy.engine.forward import Engine, Forward  # noqa: F401
    from spml_deploy.engine.pipeline import Pipeline, PipelineOptions, Prediction, load_pipeline  # noqa: F401
    from spml_deploy.errors import SpmlError  # noqa: F401
    from spml_deploy.export.bundle import export_bundle  # noqa: F401
    from spml_deploy.serving.retrieval import Hit, Retriever  # noqa: F401
    from spml_deploy.serving.segment import run_segment_job  # noqa: F401
    from spml_deploy.training.train import train  # noqa: F401


def __getattr__(name: str) -> Any:
    module = _API.get(name)
    if module is None:
        raise AttributeError(f"module 'spml_deploy' has no attribute '{name}'")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
