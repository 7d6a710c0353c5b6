"""Looking at a result: `view` serves it through neuroglancer to a real headless Chromium (the image and one layer
per class, coloured as in the preview), also a run still being written and an input volume alone; report.html is
one self-contained page that Chromium draws, with its figures and slices."""

from __future__ import annotations

import io
import json
import re
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import numpy as np
import pytest
import tifffile

from cellseg_batch.preview import class_colour, class_colour_hex
from cellseg_batch.synth import CLASSES
from conftest import HEADLESS, cli


@pytest.fixture(scope="module")
def watched_run(synth_small, tmp_path_factory):
    """A finished run, and the scenes ``view`` opened of its output while the run was writing it."""
    from cellseg_batch.errors import UserError
    from cellseg_batch.view import open_scene

    folder = tmp_path_factory.mktemp("view")
    out = folder / "out.zarr"
    # chunks of 128 px: a pyramid of 3 levels, which the browser reads as it zooms
    seen = []
    with (folder / "stderr").open("w") as stderr:
        proc = subprocess.Popen([sys.executable, "-m", "cellseg_batch", "run", synth_small["volume"], "--predictor",
                                 "labels", "--labels", synth_small["truth"], "--tile", "128", "--overlap", "16",
                                 "--chunk", "128", "--out", out, "--work-dir", folder / "work", "--keep-tiles",
                                 "--no-progress"],
                                stdout=subprocess.DEVNULL, stderr=stderr)  # fmt: skip
        while proc.poll() is None:
            try:
                seen.append(open_scene(out))
            except UserError:  # not there yet, or its attributes half written
                pass
            time.sleep(0.2)
    assert proc.returncode == 0, (folder / "stderr").read_text()[-3000:]
    return out, seen


@pytest.fixture(scope="module")
def small_run(watched_run):
    return watched_run[0]


@contextmanager
def browser_at(chromium: str, url: str):
    """Chromium (headless) showing ``url`` until the block ends."""
    proc = subprocess.Popen([chromium, *HEADLESS, "--window-size=1000,700", "--remote-debugging-port=0", url],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        yield proc
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def screenshot(served, chromium: str) -> np.ndarray:
    """What a headless Chromium showing the viewer draws (RGB)."""
    with browser_at(chromium, served.url), ThreadPoolExecutor(1) as pool:
        # screenshot() waits for a connected browser to draw (it would wait forever for one that never comes)
        shot = pool.submit(served.viewer.screenshot, size=[640, 480]).result(timeout=120)
    return picture(shot.screenshot.image)


def picture(png: bytes) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(np.int32)


def assert_not_blank(rgb: np.ndarray) -> None:
    colours = len(np.unique((rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]))
    assert colours > 50 and rgb.std() > 10, f"blank picture: {colours} colours, std {rgb.std():.1f}"


def near(rgb: np.ndarray, colour: tuple[float, float, float], alpha: float) -> int:
    """Pixels that look like ``colour`` blended with any grey at opacity ``alpha``: channel differences kept."""
    c = np.array(colour) * 255 * alpha
    diff = rgb - rgb[..., :1]
    return int((np.abs(diff - (c - c[0])).max(axis=-1) < 12).sum())


def test_view_shows_the_run_in_neuroglancer_in_a_browser(small_run, neuroglancer, chromium):
    from cellseg_batch.view import neuroglancer_viewer, open_scene

    served = neuroglancer_viewer(open_scene(small_run))
    viewer, url = served.viewer, served.url
    assert url.startswith("http://127.0.0.1:") and served.files.url.startswith("http://127.0.0.1:")
    layers = viewer.state.layers
    assert [layer.name for layer in layers] == ["image", *CLASSES]
    assert layers["image"].type == "image"
    for k, name in enumerate(CLASSES):
        assert layers[name].type == "segmentation" and layers[name].segment_default_color == class_colour_hex(k)
    # the browser reads the finished output's pyramids from its files, served on 127.0.0.1 too
    assert layers["cell"].source[0].url == f"zarr://{served.files.url}/labels/cell/"
    rgb = screenshot(served, chromium)
    assert [layer.name for layer in viewer.state.layers] == ["image", *CLASSES]  # as the browser has them now
    assert_not_blank(rgb)
    # the cells are drawn in the preview's cell colour, over the image (neuroglancer's default opacity 0.5)
    assert near(rgb, class_colour(0), 0.5) > 1000


def test_view_command_serves_on_localhost_and_reports_problems_in_one_line(small_run, synth_small, neuroglancer,
                                                                          tmp_path):  # fmt: skip
    port = free_port_pair()
    proc = subprocess.Popen([sys.executable, "-m", "cellseg_batch", "view", str(small_run), "--timeout", "60",
                             "--port", str(port)], stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        lines = [proc.stdout.readline() for _ in range(3)]
        assert lines[0].startswith(f"{small_run} (complete): image, {', '.join(CLASSES)}")
        url = lines[1].split()[-1]
        assert url.startswith(f"http://127.0.0.1:{port}/")
        assert f"port {port} and {port + 1};" in lines[2]  # the viewer's, and the output's files'
        assert urllib.request.urlopen(f"http://127.0.0.1:{port + 1}/cellseg/report.json", timeout=30).status == 200
        page = urllib.request.urlopen(url, timeout=30).read().decode()
        assert "neuroglancer" in page.lower() and "<script" in page  # the viewer's page, served by this process
        busy = cli("view", small_run, "--port", port, check=False)  # the ports are taken: by the view above
        assert busy.returncode == 2 and f"port {port} or {port + 1} is in use" in busy.stderr, busy.stderr
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    tif = cli("view", synth_small["volume"], "--timeout", "0")
    assert "(input): image\n" in tif.stdout
    for args, message in [((tmp_path / "nothing.zarr",), "does not exist"),
                          ((tmp_path,), "is neither a cellseg-batch output nor a volume"),
                          ((small_run, "--napari"), "--napari needs napari")]:  # fmt: skip
        if args[-1] == "--napari" and _has("napari") and _has("napari_ome_zarr"):
            continue
        proc = cli("view", *args, check=False)
        assert proc.returncode == 2 and message in proc.stderr and proc.stderr.count("\n") == 1, proc.stderr
        assert not proc.stdout


def free_port_pair() -> int:
    """A port that is free, with the next one free too."""
    import socket

    for _ in range(50):
        with socket.socket() as a, socket.socket() as b:
            a.bind(("127.0.0.1", 0))
            port = a.getsockname()[1]
            try:
                b.bind(("127.0.0.1", port + 1))
            except OSError:
                continue
            return port
    raise RuntimeError("no two free ports in a row")


def _has(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def test_view_opens_a_run_while_it_writes_its_output(watched_run, neuroglancer):
    """What a real run (with --work-dir) had written when looked at: incomplete, then complete."""
    from cellseg_batch.view import neuroglancer_viewer, open_scene

    out, seen = watched_run
    running = [scene for scene in seen if scene.status == "incomplete"]
    assert running, f"the output was never seen incomplete ({len(seen)} looks)"
    assert open_scene(out.parent / "work").path == out  # the work store (kept: --keep-tiles) names its output
    scene = running[-1]  # its arrays read what is written now: the finished result
    served = neuroglancer_viewer(scene)
    assert served.files is None  # read by view itself: the run had not written the NGFF metadata yet
    assert [layer.name for layer in served.viewer.state.layers] == ["image", *scene.labels]


def test_view_a_run_still_being_written_and_an_input_volume(tmp_path, synth_small, neuroglancer, chromium):
    """What the writer has made so far: the image before any labels, then the label layers as they come."""
    from cellseg_batch.view import neuroglancer_viewer, open_scene
    from cellseg_batch.write import Output

    out = Output(tmp_path / "running.zarr")
    out.create((4, 64, 64), 64, ["cell", "mitochondrion"], np.uint8, (40.0, 8.0, 8.0), {"version": "test"})
    out.write_levels(None, 2, 0, 0, np.random.default_rng(0).integers(0, 255, (64, 64), dtype=np.uint8), 1)
    scene = open_scene(out.path)
    assert (scene.status, list(scene.labels), scene.pixel_size_nm) == ("incomplete", [], (40.0, 8.0, 8.0))
    assert "not written yet: cell, mitochondrion" in scene.describe()
    assert [layer.name for layer in neuroglancer_viewer(scene).viewer.state.layers] == ["image"]
    ids = np.zeros((64, 64), np.uint32)
    ids[8:56, 8:40] = 5
    out.create_labels(np.uint32)
    out.write_levels("cell", 2, 0, 0, ids, 1)
    scene = open_scene(out.path)
    assert list(scene.labels) == ["cell", "mitochondrion"] and scene.colour("mitochondrion") == class_colour_hex(1)
    assert (np.asarray(scene.labels["cell"][2]) == ids).all() and not np.asarray(scene.labels["cell"][1]).any()
    served = neuroglancer_viewer(scene)  # read here, from the arrays as they are: the metadata is not written yet
    assert [layer.name for layer in served.viewer.state.layers] == ["image", "cell", "mitochondrion"]
    assert served.files is None
    rgb = screenshot(served, chromium)  # the middle slice (2): the image and the cell written so far
    assert_not_blank(rgb)
    assert near(rgb, class_colour(0), 0.5) > 1000

    scene = open_scene(synth_small["volume"])  # the input alone: the image, read lazily window by window
    assert scene.status == "input" and not scene.labels
    volume = tifffile.imread(synth_small["volume"])
    assert (scene.image[2:5, 10:50, 300:384] == volume[2:5, 10:50, 300:384]).all()
    assert [layer.name for layer in neuroglancer_viewer(scene).viewer.state.layers] == ["image"]


def test_report_html_is_one_self_contained_page_a_browser_draws(small_run, chromium, tmp_path):
    page = small_run / "cellseg" / "report.html"
    text = page.read_text()
    for figure in ["when each stage ran (stages overlap), and its throughput", "tiles/s over the run", "objects per class", "cell: size", "cell: z-extent",
                   "touching_unmatched per slice", "slice 0: start", "slice 4: middle", "slice 7: end"]:  # fmt: skip
        assert figure in text
    assert text.count("<svg") >= 6 and text.count('src="data:image/png;base64,') >= 3
    assert "<polyline" in text  # tiles/s over the run: samples were recorded
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//|url\(|@import""", text), "an external reference"
    shot = tmp_path / "report.png"
    subprocess.run([chromium, *HEADLESS, "--disable-gpu", "--window-size=1100,3000", f"--screenshot={shot}", page.as_uri()],
                   check=True, timeout=120, capture_output=True)  # fmt: skip
    rgb = picture(shot.read_bytes())
    assert_not_blank(rgb)
    assert near(rgb, class_colour(0), 1.0) > 2000  # the cells' bars and histograms, in the preview's cell colour


def test_gallery_slices_are_the_ends_the_middle_and_the_most_touching():
    from cellseg_batch.report_html import gallery_slices

    touching = [0, 3, 0, 9, 0, 0, 1, 0, 0, 2]
    assert gallery_slices(10, touching) == {0: "start", 1: "touching_unmatched 3", 3: "touching_unmatched 9",
                                            5: "middle", 9: "end touching_unmatched 2"}  # fmt: skip
    assert gallery_slices(1, None) == {0: "start middle end"}


def test_view_reads_ngff_05_zarr_v3_outputs(tmp_path):
    """The metadata of NGFF 0.5 (zarr.json, under "ome") is found as that of 0.4 (.zattrs)."""
    import zarr

    from cellseg_batch.view import open_scene

    ome = {"version": "0.5", "multiscales": [{"axes": [{"name": a, "type": "space", "unit": "nanometer"} for a in "zyx"],
                                              "datasets": [{"path": "0", "coordinateTransformations": [
                                                  {"type": "scale", "scale": [50.0, 4.0, 4.0]}]}]}]}  # fmt: skip
    info = {"status": "complete", "classes": ["cell"], "image": True, "pixel_size_nm": None}
    root = zarr.open_group(tmp_path / "v3.zarr", mode="w", zarr_format=3, attributes={"ome": ome, "cellseg_batch": info})
    root.create_array("0", shape=(2, 8, 8), chunks=(1, 8, 8), dtype=np.uint8)[:] = 9
    cell = root.create_group("labels").create_group("cell", attributes={"ome": ome})
    cell.create_array("0", shape=(2, 8, 8), chunks=(1, 8, 8), dtype=np.uint32)[1, 2:4, 2:4] = 3
    scene = open_scene(tmp_path / "v3.zarr")
    assert (scene.status, scene.ngff, scene.pixel_size_nm, list(scene.labels)) == ("complete", True, (50.0, 4.0, 4.0), ["cell"])
    assert scene.labels["cell"][1, 2, 3] == 3 and scene.image[0, 0, 0] == 9


def test_view_shows_an_ngff_05_sharded_output_in_a_browser(synth_small, tmp_path, neuroglancer, chromium):
    """Neuroglancer reads the zarr v3 output and its shards (``--format ngff-0.5``; a shard's index is read with a
    byte range) as it reads 0.4."""
    from cellseg_batch.view import neuroglancer_viewer, open_scene

    out = tmp_path / "v05.zarr"
    cli("run", synth_small["volume"], "--predictor", "labels", "--labels", synth_small["truth"], "--tile", 128,
        "--overlap", 16, "--chunk", 128, "--format", "ngff-0.5", "--out", out, "--no-progress")  # fmt: skip
    assert json.loads((out / "labels" / "cell" / "0" / "zarr.json").read_text())["codecs"][0]["name"] == "sharding_indexed"
    served = neuroglancer_viewer(open_scene(out))
    assert served.viewer.state.layers["cell"].source[0].url == f"zarr3://{served.files.url}/labels/cell/"
    rgb = screenshot(served, chromium)
    assert [layer.name for layer in served.viewer.state.layers] == ["image", *CLASSES]
    assert_not_blank(rgb)
    assert near(rgb, class_colour(0), 0.5) > 1000
