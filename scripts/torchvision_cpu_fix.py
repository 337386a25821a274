"""Lazy import hook: make a CUDA-built torchvision importable on a CPU-only torch.

Installed by scripts/install.sh (only when ``torch.version.cuda is None``) as
``<site-packages>/_chimera_torchvision_fix.py`` plus a one-line ``.pth`` file that imports it.

Why (shared/DESIGN.md section 4): with ``torch==2.13.0`` pinned, pip picks the torchvision
0.28.0 wheel, which is a CUDA build. On a CPU-only torch its ``_C`` extension does not load,
and ``torchvision/_meta_registrations.py`` then fails with
``RuntimeError: operator torchvision::nms does not exist``. torchmetrics imports torchvision
when it is installed, so ``import lightning``/``torchmetrics``/``timm`` fail as well.
Defining the two op schemas (no kernels) before torchvision's first import fixes it; ``nms``
itself, ``deform_conv2d`` and the JPEG codecs stay unavailable.

At interpreter start this module only puts a finder at the front of ``sys.meta_path`` (no torch
import, negligible start-up cost). The first time ``torchvision`` is imported, the finder removes
itself, imports torch and, if torch is a CPU build and torchvision's native ops cannot be
loaded, defines the schemas. It then returns ``None`` so the normal import proceeds.
"""

import sys

# Schemas exactly as torchvision's C++ (csrc/ops/nms.cpp) registers them; matching
# fake/meta kernels are in torchvision/_meta_registrations.py.
SCHEMAS = (
    "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
)

# The torch.library.Library object must stay alive: dropping it deregisters the schemas.
_LIB = None


def _native_ops_load(torch):
    """Try to load torchvision's own ``_C`` extension the way torchvision does.

    Returns True when it loads (a CPU torchvision build, say): its ops are real, and defining
    our schemas first would make its registration fail. Nothing of torchvision is imported.
    """
    import importlib.machinery
    import os

    spec = importlib.machinery.PathFinder.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        return False
    for d in spec.submodule_search_locations:
        for suffix in importlib.machinery.EXTENSION_SUFFIXES:
            path = os.path.join(d, "_C" + suffix)
            if os.path.exists(path):
                try:
                    torch.ops.load_library(path)
                    return True
                except (ImportError, OSError):
                    return False
    return False


def _define_schemas():
    global _LIB
    try:
        import torch
    except ImportError:
        return
    if torch.version.cuda is not None or _LIB is not None:
        return
    if _native_ops_load(torch):
        return
    lib = torch.library.Library("torchvision", "FRAGMENT")
    for schema in SCHEMAS:
        name = schema.split("(", 1)[0]
        try:
            getattr(torch.ops.torchvision, name)
            continue  # already defined by someone else
        except (AttributeError, RuntimeError):
            pass
        lib.define(schema)
    _LIB = lib


class _TorchvisionCpuFixFinder:
    """Meta-path finder that never finds anything; it only acts once, on ``torchvision``."""

    @classmethod
    def find_spec(cls, fullname, path=None, target=None):
        if fullname != "torchvision":
            return None
        uninstall()
        try:
            _define_schemas()
        except Exception as exc:  # never break the import machinery itself
            import warnings

            warnings.warn(f"torchvision CPU fix failed: {type(exc).__name__}: {exc}", stacklevel=2)
        return None


def install():
    if "torchvision" in sys.modules:
        return
    if not any(f is _TorchvisionCpuFixFinder for f in sys.meta_path):
        sys.meta_path.insert(0, _TorchvisionCpuFixFinder)


def uninstall():
    while _TorchvisionCpuFixFinder in sys.meta_path:
        sys.meta_path.remove(_TorchvisionCpuFixFinder)


if __name__ != "__main__":
    install()
