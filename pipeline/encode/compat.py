"""Make ``import torchvision`` work beside a CPU-only torch.

PyPI's torchvision wheels for Linux are CUDA builds. Installed next to the CPU
wheel of torch, their import fails with ``operator torchvision::nms does not
exist``: the Python side registers fake kernels for operators that the compiled
extension never defined. open_clip and timm import torchvision at import time,
so the whole project would fail to import.

:func:`ensure_torchvision` first tries the plain import. Only if that fails does
it define the schemas of torchvision's operators (no kernels: detection ops stay
unusable, which Fusioner never calls) and import again. On a normal install,
CUDA or CPU, nothing is changed.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys

# Schemas of torchvision's compiled operators (torchvision/csrc/ops/*.cpp).
_SCHEMAS = (
    "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "roi_align(Tensor input, Tensor rois, float spatial_scale, SymInt pooled_height, "
    "SymInt pooled_width, int sampling_ratio, bool aligned) -> Tensor",
    "_roi_align_backward(Tensor grad, Tensor rois, float spatial_scale, SymInt pooled_height, "
    "SymInt pooled_width, SymInt batch_size, SymInt channels, SymInt height, SymInt width, "
    "int sampling_ratio, bool aligned) -> Tensor",
    "roi_pool(Tensor input, Tensor rois, float spatial_scale, SymInt pooled_height, "
    "SymInt pooled_width) -> (Tensor, Tensor)",
    "_roi_pool_backward(Tensor grad, Tensor rois, Tensor argmax, float spatial_scale, "
    "SymInt pooled_height, SymInt pooled_width, SymInt batch_size, SymInt channels, "
    "SymInt height, SymInt width) -> Tensor",
    "ps_roi_align(Tensor input, Tensor rois, float spatial_scale, SymInt pooled_height, "
    "SymInt pooled_width, int sampling_ratio) -> (Tensor, Tensor)",
    "_ps_roi_align_backward(Tensor grad, Tensor rois, Tensor channel_mapping, float spatial_scale, "
    "SymInt pooled_height, SymInt pooled_width, int sampling_ratio, SymInt batch_size, "
    "SymInt channels, SymInt height, SymInt width) -> Tensor",
    "ps_roi_pool(Tensor input, Tensor rois, float spatial_scale, SymInt pooled_height, "
    "SymInt pooled_width) -> (Tensor, Tensor)",
    "_ps_roi_pool_backward(Tensor grad, Tensor rois, Tensor channel_mapping, float spatial_scale, "
    "SymInt pooled_height, SymInt pooled_width, SymInt batch_size, SymInt channels, "
    "SymInt height, SymInt width) -> Tensor",
    "deform_conv2d(Tensor input, Tensor weight, Tensor offset, Tensor mask, Tensor bias, "
    "SymInt stride_h, SymInt stride_w, SymInt pad_h, SymInt pad_w, SymInt dilation_h, "
    "SymInt dilation_w, SymInt groups, SymInt offset_groups, bool use_mask) -> Tensor",
    "_deform_conv2d_backward(Tensor grad, Tensor input, Tensor weight, Tensor offset, "
    "Tensor mask, Tensor bias, SymInt stride_h, SymInt stride_w, SymInt pad_h, SymInt pad_w, "
    "SymInt dilation_h, SymInt dilation_w, SymInt groups, SymInt offset_groups, bool use_mask) "
    "-> (Tensor, Tensor, Tensor, Tensor, Tensor)",
)

# The library object must outlive the import: dropping it unregisters the schemas.
_LIBRARY: list = []


def _drop_partial_import() -> None:
    for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
        del sys.modules[name]


def ensure_torchvision() -> str:
    """Import torchvision, patching missing operator schemas only if needed.

    Returns ``"native"`` when the plain import worked, ``"patched"`` when the
    schemas had to be defined, ``"absent"`` when torchvision is not installed.
    """
    try:
        import torchvision  # noqa: F401
        return "native"
    except ModuleNotFoundError:
        return "absent"
    except (RuntimeError, OSError, ImportError):
        _drop_partial_import()
    if not _LIBRARY:
        import torch

        lib = torch.library.Library("torchvision", "DEF")
        for schema in _SCHEMAS:
            try:
                lib.define(schema)
            except RuntimeError:
                pass  # already defined by a partial extension load
        _LIBRARY.append(lib)
    import torchvision  # noqa: F401,F811
    return "patched"


class _AlreadyLoaded(importlib.abc.Loader):
    """Hands the import system a module that :func:`ensure_torchvision` has already imported."""

    def __init__(self, module) -> None:
        self.module = module

    def create_module(self, spec):
        return self.module

    def exec_module(self, module) -> None:
        pass


class _TorchvisionOnFirstImport(importlib.abc.MetaPathFinder):
    """Runs :func:`ensure_torchvision` the first time anything imports torchvision, then steps aside."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname != "torchvision":
            return None
        sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, _TorchvisionOnFirstImport)]
        if ensure_torchvision() == "absent":
            return None
        module = sys.modules["torchvision"]
        spec = importlib.util.spec_from_loader("torchvision", _AlreadyLoaded(module), origin=module.__spec__.origin,
                                               is_package=True)
        spec.submodule_search_locations = list(module.__path__)
        return spec


def install_import_hook() -> None:
    """Make a later ``import torchvision`` (by open_clip, timm, a notebook) go through :func:`ensure_torchvision`.

    Installing costs nothing (torch is not imported until torchvision is); on a
    normal install the hook finds the plain import working and changes nothing.
    """
    if "torchvision" in sys.modules or any(isinstance(f, _TorchvisionOnFirstImport) for f in sys.meta_path):
        return
    sys.meta_path.insert(0, _TorchvisionOnFirstImport())
