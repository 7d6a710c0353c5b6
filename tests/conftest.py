"""Shared fixtures: synthetic data written once per session, and the CLI run as users run it (a subprocess)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = Path(os.environ.get("CELLSEG_SHARED_DATA", REPO.parent / "shared" / "data"))


def cli(*args, timeout: float = 600, check: bool = True, **kwargs) -> subprocess.CompletedProcess:
    """``cellseg-batch ARGS`` in a subprocess; ``check`` asserts exit status 0 and shows stderr otherwise."""
    proc = subprocess.run([sys.executable, "-m", "cellseg_batch", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, **kwargs)  # fmt: skip
    if check:
        assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-5000:]}"
    return proc


def labels_of(path: str | Path, name: str, level: int = 0) -> np.ndarray:
    import zarr

    return np.asarray(zarr.open_array(str(Path(path) / "labels" / name / str(level)), mode="r")[:])


def assert_same_instances(pred: np.ndarray, truth: np.ndarray) -> None:
    """One-to-one: every truth instance is exactly one predicted instance (IoU 1.0) and vice versa."""
    assert ((pred > 0) == (truth > 0)).all(), "foreground differs"
    fg = truth > 0
    pairs = np.unique(np.stack([truth[fg], pred[fg]]), axis=1)
    assert len(np.unique(pairs[0])) == pairs.shape[1], "a truth instance is split"
    assert len(np.unique(pairs[1])) == pairs.shape[1], "predicted instances merge truth instances"


@pytest.fixture(scope="session")
def synth_small(tmp_path_factory) -> dict[str, Path]:
    """A small synthetic volume (8 x 384 x 384, cells up to ~260 px) with its truth."""
    from cellseg_batch.synth import write_synthetic

    return write_synthetic(tmp_path_factory.mktemp("synth") / "small", (8, 384, 384), seed=5)


def _missing(what: str) -> None:
    """Skip, saying why, where ``what`` is missing; fail instead with CELLSEG_REQUIRE_BROWSER=1 (CI)."""
    if os.environ.get("CELLSEG_REQUIRE_BROWSER") == "1":
        pytest.fail(f"CELLSEG_REQUIRE_BROWSER=1 but {what}")
    pytest.skip(what)


@pytest.fixture(scope="session")
def chromium() -> str:
    """The path of a Chromium to run headless (Debian: apt-get install -y chromium)."""
    import shutil

    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        _missing("chromium is not installed (apt-get install -y chromium)")
    return path


@pytest.fixture(scope="session")
def neuroglancer():
    """The neuroglancer package (pip install 'cellseg-batch[view]')."""
    try:
        import neuroglancer
    except ImportError:
        _missing("neuroglancer is not installed (pip install 'cellseg-batch[view]')")
    return neuroglancer


# Chromium without a display or GPU, as root: WebGL (neuroglancer) drawn by SwiftShader on the CPU
HEADLESS = ["--headless", "--no-sandbox", "--no-first-run", "--hide-scrollbars", "--enable-unsafe-swiftshader",
            "--use-angle=swiftshader", "--disable-dev-shm-usage"]  # fmt: skip
