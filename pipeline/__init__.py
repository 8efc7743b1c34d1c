"""Fusioner: open-vocabulary semantic segmentation on frozen vision-language models.

The notebook API (each keyword-only, each returning data; see docs/api.md)::

    import pipeline
    pipeline.extract(backbone="clip-b", dataset="folder", data_root="data", out="cache/clip-b")
    pipeline.train(cache="cache/clip-b", out="runs/f0", protocol="custom", config={...})
    pipeline.evaluate(run="runs/f0")
    pipeline.predict(image="photo.jpg", classes=["cat", "sofa"], run="runs/f0")
    pipeline.run_study(study="pipeline/studies/tiny.yaml")

``import pipeline`` also makes ``import open_clip`` / ``import timm`` work beside a
CPU-only torch (see :mod:`pipeline.encode.compat`); on a normal install it changes nothing.
The sub-packages follow the data: data -> store -> encode -> model -> train -> eval -> sweep.
"""

from importlib.metadata import PackageNotFoundError, version

from pipeline.encode.compat import install_import_hook

install_import_hook()

try:
    __version__ = version("fusioner")
except PackageNotFoundError:  # a source tree that was never installed
    __version__ = "0.0.0+unknown"

_API = ("create_encoder", "extract", "build_model", "train_config", "train", "evaluate", "predict", "run_study")
__all__ = list(_API)


def __getattr__(name: str):
    """The API functions load on first use, so ``fusioner --help`` stays fast."""
    if name in _API:
        from pipeline import api

        return getattr(api, name)
    raise AttributeError(f"module 'pipeline' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(list(globals()) + list(_API))
