"""Import detectron2 v0.6 on a modern stack: the one place that knows what torch 2, numpy 2 and Pillow 10+ break.

Every module of this project imports detectron2 through :func:`detectron2_ready` (or imports this module first).
An official detectron2 build with compiled ops is used unchanged; the PyPI-sourced Python-only install
(``cellseg_batch.setup_detectron2``) gets a placeholder ``detectron2._C`` whose attributes raise a clear error,
which is what upstream main itself does when its ops are missing. What still needs the ops (deformable
convolution, rotated boxes, the C++ COCO evaluation) fails with that error; Mask R-CNN does not need them.
"""

from __future__ import annotations

import importlib.util
import pickle
import random
import sys
import types
from pathlib import Path

_READY = False


class MissingCompiledOps(RuntimeError):
    pass


class _MissingC(types.ModuleType):
    """Stands in for ``detectron2._C`` where detectron2 was installed without its compiled extension."""

    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        raise MissingCompiledOps(
            f"detectron2._C.{name} is a compiled op, and this detectron2 was installed without them; use a config "
            "without deformable convolution or rotated boxes, or install detectron2 from its official source"
        )

    @staticmethod
    def get_compiler_version() -> str:
        return "not built (detectron2 installed without compiled ops)"

    @staticmethod
    def get_cuda_version() -> str:
        return "not built"

    @staticmethod
    def has_cuda() -> bool:
        return False


def _package_dir() -> Path | None:
    spec = importlib.util.find_spec("detectron2")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def has_compiled_ops() -> bool:
    """Whether the installed detectron2 ships its compiled extension (``_C``)."""
    pkg = _package_dir()
    return pkg is not None and any(pkg.glob("_C*.so")) or (pkg is not None and any(pkg.glob("_C*.pyd")))


def _patch_stack() -> None:
    import warnings

    import numpy as np
    from PIL import Image

    # v0.6 scripts a few helpers at import; torch >= 2.10 warns about torch.jit.script on every import
    warnings.filterwarnings("ignore", message=r"`torch\.jit\.script` is deprecated", category=FutureWarning)
    warnings.filterwarnings("ignore", message=r"torch\.meshgrid: in an upcoming release", category=UserWarning)
    # Pillow >= 10 removed Image.LINEAR, which detectron2 v0.6 uses as a default argument.
    if not hasattr(Image, "LINEAR"):
        Image.LINEAR = Image.BILINEAR
    # numpy >= 1.24 removed the aliases some v0.6 evaluators use.
    for alias, real in (("int", int), ("float", float), ("bool", bool)):
        if alias not in np.__dict__:
            setattr(np, alias, real)
    # setuptools >= 81 no longer ships pkg_resources; model_zoo only needs resource_filename.
    try:
        import pkg_resources  # noqa: F401
    except ImportError:
        shim = types.ModuleType("pkg_resources")

        def resource_filename(package: str, resource: str) -> str:
            return str(Path(importlib.util.find_spec(package).submodule_search_locations[0]) / resource)

        shim.resource_filename = resource_filename
        sys.modules["pkg_resources"] = shim
    _import_torchvision_ops()


def _import_torchvision_ops() -> None:
    """Import torchvision.ops without importing torch._dynamo (1.4 s of each actor's start, measured).

    torchvision's ``roi_align`` (0.29 here) does ``from torch._dynamo.utils import is_compile_supported`` at import,
    for a fallback it takes only without its compiled ops or under deterministic algorithms on a GPU. While
    torchvision imports, that module is a stand-in whose function imports the real one when first called; it is
    removed right after, so any later ``import torch._dynamo`` (torch.compile) gets the real package. Where the
    import fails with the stand-in, torchvision is imported as usual."""
    name = "torch._dynamo.utils"
    if "torchvision.ops" in sys.modules or name in sys.modules or importlib.util.find_spec("torchvision") is None:
        return
    import torch  # noqa: F401  (before the stand-in: torch itself must see the real module tree)

    if "torch._dynamo" in sys.modules:
        return

    def is_compile_supported(device_type):
        from torch._dynamo.utils import is_compile_supported as real

        return real(device_type)

    stand_in = types.ModuleType(name)
    stand_in.is_compile_supported = is_compile_supported
    sys.modules[name] = stand_in
    try:
        import torchvision.ops  # noqa: F401
    except Exception:  # imported as usual below; modules that did import stay (their registrations ran once)
        pass
    finally:
        if sys.modules.get(name) is stand_in:
            del sys.modules[name]
    dynamo = sys.modules.get("torch._dynamo")
    if dynamo is not None and getattr(dynamo, "utils", None) is stand_in:  # imported meanwhile: the real one
        del dynamo.utils
        importlib.import_module(name)
    import torchvision.ops  # noqa: F401, F811  (nothing to do where the import above succeeded)


class _ArraysOnly(pickle.Unpickler):
    """Unpickles numpy arrays in plain containers (what model-zoo .pkl weights hold) and nothing else: a pickle
    that names any other callable is refused instead of run."""

    ALLOWED = {("collections", "OrderedDict"), ("numpy", "ndarray"), ("numpy", "dtype"),
               *((m, n) for m in ("numpy.core.multiarray", "numpy._core.multiarray") for n in ("_reconstruct", "scalar"))}  # fmt: skip

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"it names {module}.{name}, which weights never need")
        return super().find_class(module, name)


def load_weights_file(self, filename: str) -> dict:
    """``DetectionCheckpointer._load_file`` that runs no code from the file: .pth/.pt through ``torch.load(...,
    weights_only=True)``; model-zoo .pkl through an unpickler of numpy arrays only (detectron2 itself calls
    ``pickle.load``, which can run anything); pycls .pyth refused (detectron2 calls ``torch.load`` on it with
    whatever the default is)."""
    import torch
    from detectron2.utils.file_io import PathManager

    from .errors import UserError

    try:
        with PathManager.open(filename, "rb") as f:
            if filename.endswith(".pyth"):
                raise UserError(f"{filename}: pycls .pyth checkpoints are not loaded; convert it to a .pth state dict")
            if not filename.endswith(".pkl"):
                loaded = torch.load(f, map_location="cpu", weights_only=True)
                return loaded if "model" in loaded else {"model": loaded}
            data = _ArraysOnly(f, encoding="latin1").load()
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError) as e:
        raise UserError(f"{filename} cannot be loaded as weights only ({str(e).splitlines()[0]})") from e
    if "model" in data and "__author__" in data:  # detectron2 model zoo format (as detectron2 reads it)
        return data
    data = data.get("blobs", data)  # Caffe2 / Detectron1 model zoo: detection models have "blobs"
    return {"model": {k: v for k, v in data.items() if not k.endswith("_momentum")}, "__author__": "Caffe2",
            "matching_heuristics": True}  # fmt: skip


def _patch_detectron2() -> None:
    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.data import common

    # nothing executable from a weights file a user is handed (run's --model, train's --weights and --resume)
    DetectionCheckpointer._load_file = load_weights_file

    # Python >= 3.11 refuses random.sample(set); v0.6's MapDataset retry path does that when an item fails.
    original_init = common.MapDataset.__init__

    def init(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        self._rng = _SetSamplingRandom(42)

    common.MapDataset.__init__ = init


class _SetSamplingRandom(random.Random):
    """random.Random whose sample() takes a set (sorted first, so retries stay deterministic)."""

    def sample(self, population, k, **kwargs):
        if isinstance(population, (set, frozenset)):
            population = sorted(population)
        return super().sample(population, k, **kwargs)


def detectron2_ready() -> types.ModuleType:
    """Import detectron2 with the compatibility fixes applied once; returns the detectron2 module."""
    global _READY
    if _READY:
        import detectron2

        return detectron2
    if _package_dir() is None:
        raise ImportError(
            "detectron2 is not installed; run `python -m cellseg_batch.setup_detectron2` (or `make setup`), "
            "or install it from https://github.com/facebookresearch/detectron2"
        )
    _patch_stack()
    if not has_compiled_ops() and "detectron2._C" not in sys.modules:
        sys.modules["detectron2._C"] = _MissingC("detectron2._C")
    import detectron2

    if "detectron2._C" in sys.modules and isinstance(sys.modules["detectron2._C"], _MissingC):
        detectron2._C = sys.modules["detectron2._C"]
    _patch_detectron2()
    _READY = True
    return detectron2
