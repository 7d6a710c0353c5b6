"""Doctor: what this installation can do: versions, devices, Ray, and detectron2's compiled ops."""

from __future__ import annotations

import os
import platform
from importlib.metadata import PackageNotFoundError, version


def _version(name: str) -> str:
    try:
        return version(name)
    except PackageNotFoundError:
        return "not installed"


def report() -> str:
    lines = [f"cellseg-batch {_version('cellseg-batch')}", f"python       {platform.python_version()} ({platform.machine()})"]
    for name in ("numpy", "torch", "torchvision", "detectron2", "ray", "zarr", "tifffile", "imagecodecs", "h5py",
                 "pycocotools", "ome-zarr"):
        lines.append(f"{name:12s} {_version(name)}")
    lines.append(f"cpu cores    {os.cpu_count()}")
    try:
        import torch

        if torch.cuda.is_available():
            for i in range(torch.cuda.device_count()):
                p = torch.cuda.get_device_properties(i)
                lines.append(f"gpu {i}        {p.name}, {p.total_memory / 2**30:.0f} GiB, CUDA {torch.version.cuda}")
        else:
            lines.append("gpu          none visible (inference and training run on the CPU)")
    except ImportError:
        lines.append("gpu          unknown (torch is not installed)")
    try:
        from .d2compat import detectron2_ready, has_compiled_ops

        detectron2_ready()
        where = os.path.dirname(__import__("detectron2").__file__)
        ops = "yes" if has_compiled_ops() else "no (Python-only install: Mask R-CNN works; deformable conv, rotated boxes and the C++ COCO eval do not)"
        lines.append(f"detectron2   {where}")
        lines.append(f"compiled ops {ops}")
    except ImportError as e:
        lines.append(f"detectron2   {e}")
    try:
        import ray

        if ray.is_initialized():
            lines.append(f"ray cluster  {ray.cluster_resources()}")
        else:
            address = os.environ.get("RAY_ADDRESS")
            lines.append(f"ray cluster  {'RAY_ADDRESS=' + address if address else 'none running here (run starts a local one)'}")
    except ImportError:
        lines.append("ray          not installed")
    return "\n".join(lines)
