"""Memory stays bounded: a lazily synthesized volume far larger than any process may use runs through."""

import subprocess
import sys
import threading
import time

import psutil

from conftest import labels_of

SHAPE = (6, 8192, 8192)
LIMIT = 1.2e9  # bytes of resident memory for any one process (driver or Ray worker)


def test_a_volume_larger_than_memory_runs_with_bounded_memory(tmp_path):
    uri = "synth:{}x{}x{},seed=2".format(*SHAPE)
    out = tmp_path / "big.zarr"
    # what this run produces if held at once: 4 classes of uint64 labels (plus the volume), ~13 GB
    output_bytes = 4 * 8 * SHAPE[0] * SHAPE[1] * SHAPE[2]
    assert output_bytes > 10 * LIMIT
    proc = subprocess.Popen([sys.executable, "-m", "cellseg_batch", "run", uri, "--predictor", "labels", "--labels",
                             uri, "--no-image", "--tile", "1024", "--overlap", "32", "--out", str(out),
                             "--no-progress"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    peak: dict[int, tuple[str, int]] = {}

    def sample():
        root = psutil.Process(proc.pid)
        while proc.poll() is None:
            try:
                procs = [root, *root.children(recursive=True)]
            except psutil.NoSuchProcess:
                break
            for p in procs:
                try:
                    rss = p.memory_info().rss
                    name = " ".join(p.cmdline()[:3])[-60:]
                except (psutil.NoSuchProcess, psutil.AccessDenied):
                    continue
                if rss > peak.get(p.pid, ("", 0))[1]:
                    peak[p.pid] = (name, rss)
            time.sleep(0.1)

    sampler = threading.Thread(target=sample)
    sampler.start()
    stdout, stderr = proc.communicate(timeout=900)
    sampler.join()
    assert proc.returncode == 0, stderr
    worst = max(peak.values(), key=lambda v: v[1])
    assert worst[1] < LIMIT, f"{worst[0]} reached {worst[1] / 1e9:.2f} GB"
    assert peak[proc.pid][1] < 0.6e9, f"the driver reached {peak[proc.pid][1] / 1e9:.2f} GB"
    # and the result is there: spot-check one slice of the coarsest level against nothing empty
    assert labels_of(out, "cell", 3).any()


def test_workers_reuse_freed_memory_instead_of_faulting_it_in_again():
    """A worker's next batch allocates arrays of the same sizes as the last one: with ``reuse_freed_memory`` (glibc)
    they come from memory the process already has, without a page fault; by default glibc gives most of it back to
    the OS and faults it in again, page by page."""
    code = """
import resource, sys, numpy as np
from cellseg_batch.distribute import reuse_freed_memory
if sys.argv[1] == "on":
    assert reuse_freed_memory()
def batch():  # 43 MiB in arrays of several sizes, freed together, like a batch of tiles
    arrays = [np.ones(2**20 * k, np.uint8) for k in (16, 12, 8, 4, 2, 1)]
    del arrays
batch()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    batch()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""
    faults = {m: int(subprocess.run([sys.executable, "-c", code, m], capture_output=True, text=True, check=True).stdout)
              for m in ("off", "on")}  # fmt: skip
    assert faults["off"] > 5000, faults  # ~28,000 here, of the ~110,000 pages the 10 batches touch
    assert faults["on"] < 100, faults
