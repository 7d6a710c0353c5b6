"""Install detectron2 0.6 (pure Python, verified sdist) where no detectron2 is installed yet.

Official detectron2 is not on PyPI. PyPI's ``pb1-detectron2==0.6`` sdist carries upstream v0.6's Python files
byte for byte but cannot be pip-installed (its setup.py compiles C++ sources it does not ship). This module
downloads that sdist, checks its sha256, and packs its ``detectron2/`` package (model-zoo configs included) into
a wheel named ``detectron2`` 0.6 with detectron2's real runtime requirements, then pip-installs the wheel.
``cellseg_batch.d2compat`` supplies what the missing compiled ops and a modern stack break.

Standard library only: it runs before the project's dependencies exist (also on an offline GPU machine, from a
carried sdist or wheel).

    python -m cellseg_batch.setup_detectron2                  # install unless a detectron2 is installed
    python -m cellseg_batch.setup_detectron2 --wheel-dir DIR  # only build the wheel (to carry it elsewhere)
    python -m cellseg_batch.setup_detectron2 --sdist FILE     # use a downloaded sdist (offline)
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import importlib.util
import io
import os
import subprocess
import sys
import tarfile
import tempfile
import urllib.request
import zipfile
from pathlib import Path

SDIST_NAME = "pb1-detectron2-0.6.tar.gz"
SDIST_URL = (
    "https://files.pythonhosted.org/packages/60/26/48f5bbb7ee492696a21da23303daeecdfe3942c498a70d34108acf63b2bd/"
    + SDIST_NAME
)
SDIST_SHA256 = "5d2e9e51e523ec72f6a31cca04b0a515492e9514b773a3d134cedc0677170b29"
VERSION = "0.6"
# detectron2 v0.6 setup.py's install_requires, minus black (a formatter it pins for its own config export).
REQUIRES = [
    "Pillow>=7.1",
    "matplotlib",
    "pycocotools>=2.0.2",
    "termcolor>=1.1",
    "yacs>=0.1.8",
    "tabulate",
    "cloudpickle",
    "tqdm>4.29.0",
    "tensorboard",
    "fvcore>=0.1.5,<0.1.6",
    "iopath>=0.1.7,<0.1.10",
    "omegaconf>=2.1",
    "hydra-core>=1.1",
]
CACHE = Path(os.environ.get("CELLSEG_CACHE", Path.home() / ".cache" / "cellseg-batch"))


class SetupError(RuntimeError):
    pass


def installed_detectron2() -> str | None:
    """Where an importable detectron2 lives, without importing it."""
    spec = importlib.util.find_spec("detectron2")
    return None if spec is None or not spec.submodule_search_locations else list(spec.submodule_search_locations)[0]


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def fetch_sdist(sdist: Path | None) -> Path:
    """The verified sdist: the one given, a cached copy, or a fresh download from PyPI."""
    path = sdist or CACHE / SDIST_NAME
    if sdist is None and not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".part")
        print(f"downloading {SDIST_URL}", file=sys.stderr)
        try:
            with urllib.request.urlopen(SDIST_URL, timeout=60) as r, open(tmp, "wb") as f:
                f.write(r.read())
        except OSError as e:
            raise SetupError(
                f"could not download {SDIST_NAME} from PyPI ({e}); download it on a machine that can and pass "
                f"--sdist PATH, or install detectron2 from its official source first"
            ) from e
        tmp.replace(path)
    if not path.exists():
        raise SetupError(f"{path} does not exist; pass the path of {SDIST_NAME}")
    digest = sha256(path)
    if digest != SDIST_SHA256:
        raise SetupError(f"{path} has sha256 {digest}, expected {SDIST_SHA256}; delete it and run again")
    return path


def build_wheel(sdist: Path, wheel_dir: Path) -> Path:
    """Pack the sdist's detectron2/ package as detectron2-0.6-py3-none-any.whl (no compiled ops)."""
    wheel_dir.mkdir(parents=True, exist_ok=True)
    dist_info = f"detectron2-{VERSION}.dist-info"
    files: dict[str, bytes] = {}
    with tarfile.open(sdist) as tar:
        prefix = "pb1-detectron2-0.6/"
        for member in tar.getmembers():
            name = member.name[len(prefix):] if member.name.startswith(prefix) else None
            if not name or not member.isfile() or not name.startswith("detectron2/"):
                continue
            if name.startswith("detectron2/layers/csrc/"):
                continue
            files[name] = tar.extractfile(member).read()
        license_text = tar.extractfile(prefix + "LICENSE").read()
    if "detectron2/__init__.py" not in files or not any(n.startswith("detectron2/model_zoo/configs/") for n in files):
        raise SetupError(f"{sdist} does not hold the detectron2 package and its model-zoo configs")
    metadata = "\n".join(
        ["Metadata-Version: 2.1", "Name: detectron2", f"Version: {VERSION}",
         "Summary: Detectron2 v0.6 Python sources (from the pb1-detectron2 sdist, no compiled ops)",
         "License: Apache-2.0", "Requires-Python: >=3.8"]
        + [f"Requires-Dist: {r}" for r in REQUIRES]
    ) + "\n"
    files[f"{dist_info}/METADATA"] = metadata.encode()
    files[f"{dist_info}/WHEEL"] = b"Wheel-Version: 1.0\nGenerator: cellseg-batch\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
    files[f"{dist_info}/LICENSE"] = license_text
    record = io.StringIO()
    for name, data in sorted(files.items()):
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        record.write(f"{name},sha256={digest},{len(data)}\n")
    record.write(f"{dist_info}/RECORD,,\n")
    files[f"{dist_info}/RECORD"] = record.getvalue().encode()
    wheel = wheel_dir / f"detectron2-{VERSION}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w", zipfile.ZIP_DEFLATED) as z:
        for name, data in sorted(files.items()):
            z.writestr(zipfile.ZipInfo(name, date_time=(2021, 11, 18, 0, 0, 0)), data, zipfile.ZIP_DEFLATED)
    return wheel


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m cellseg_batch.setup_detectron2", description=__doc__.split("\n")[0])
    p.add_argument("--sdist", type=Path, help=f"a local copy of {SDIST_NAME} (checked by sha256)")
    p.add_argument("--wheel-dir", type=Path, help="only build the wheel into this folder")
    p.add_argument("--force", action="store_true", help="install even where a detectron2 is already installed")
    args = p.parse_args(argv)
    try:
        where = installed_detectron2()
        if where and not args.force and not args.wheel_dir:
            print(f"detectron2 is already installed at {where}: using it as it is")
            return 0
        sdist = fetch_sdist(args.sdist)
        with tempfile.TemporaryDirectory() as tmp:
            wheel = build_wheel(sdist, args.wheel_dir or Path(tmp))
            if args.wheel_dir:
                print(wheel)
                return 0
            cmd = [sys.executable, "-m", "pip", "install", "--quiet", str(wheel)]
            if subprocess.call(cmd) != 0:
                raise SetupError("pip could not install the detectron2 wheel or its requirements (see above)")
        print("installed detectron2 0.6 (Python sources, no compiled ops); cellseg_batch.d2compat adapts it")
        return 0
    except SetupError as e:
        print(f"setup_detectron2: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
