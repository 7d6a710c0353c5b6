"""View: a result (finished or still being written) or an input volume in neuroglancer or napari, read lazily."""

from __future__ import annotations

import importlib.util
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import UserError
from .preview import class_colour_hex
from .read import Volume, finest_level, group_attrs, multiscales, ngff_pixel_size, open_volume


@dataclass
class Scene:
    """What there is to look at: an image and label arrays (Z, Y, X, read on demand), in the preview's colours."""

    path: Path
    status: str  # "complete", "incomplete" (a run still writing it), or "input" (a volume alone)
    image: object | None = None  # anything sliced like an array of Z, Y, X
    labels: dict[str, object] = field(default_factory=dict)  # class -> its level-0 label array, where written
    classes: list[str] = field(default_factory=list)  # every class of the run, in colour order
    pixel_size_nm: tuple[float, float, float] | None = None
    ngff: bool = False  # the NGFF metadata is written (a finished run): readers find its pyramids themselves

    def colour(self, name: str) -> str:
        return class_colour_hex(self.classes.index(name))

    def describe(self) -> str:
        what = (["image"] if self.image is not None else []) + list(self.labels)
        missing = [c for c in self.classes if c not in self.labels]
        note = f"; not written yet: {', '.join(missing)}" if missing else ""
        return f"{self.path} ({self.status}): {', '.join(what) or 'nothing written yet'}{note}"


class VolumeArray:
    """A Volume (TIFF, zarr, OME-Zarr) sliced like a Z, Y, X array, one 2D window per slice: what LocalVolume reads."""

    ndim = 3

    def __init__(self, volume: Volume):
        self.volume, self.shape, self.dtype = volume, volume.shape, volume.dtype

    def __getitem__(self, index) -> np.ndarray:
        (z0, z1, _), (y0, y1, _), (x0, x1, _) = (s.indices(n) for s, n in zip(index, self.shape))
        out = np.empty((z1 - z0, y1 - y0, x1 - x0), dtype=self.dtype)
        for z in range(z0, z1):
            out[z - z0] = self.volume.read(z, y0, y1, x0, x1)
        return out


def _array(path: Path):
    """The zarr array (v2 or v3) at ``path``, or None where it is not written (yet)."""
    import zarr

    try:
        return zarr.open_array(str(path), mode="r")
    except (FileNotFoundError, zarr.errors.ArrayNotFoundError, zarr.errors.NodeTypeValidationError):
        return None


def open_scene(path: str | Path) -> Scene:
    """A cellseg-batch output (its image copy and one label layer per class, what exists so far for a run still
    going), or any volume ``run`` reads (the image alone)."""
    p = Path(path)
    if not p.exists():
        raise UserError(f"{path} does not exist; give a cellseg-batch output (OUT.zarr) or an input volume")
    attrs = group_attrs(p)
    info = (attrs or {}).get("cellseg_batch")
    if not info and (p / "run.json").exists():  # a run's work store (--work-dir): its output, as far as written
        return _output_of_work_store(p)
    if not info:
        try:
            volume = open_volume(str(p))
        except UserError as e:
            raise UserError(f"{path} is neither a cellseg-batch output nor a volume to view ({e})") from e
        return Scene(p, "input", image=VolumeArray(volume), pixel_size_nm=volume.pixel_size_nm)
    classes = list(info.get("classes", []))
    # written when the run completes: on the image copy; on each label image of a --no-image output (its root is no
    # image), which was served from level 0 in this process, its first slice placed at 0 whatever its --slices
    ms = multiscales(attrs) or (multiscales(group_attrs(p / "labels" / classes[0]) or {}) if classes else None)
    pixel = ngff_pixel_size(ms, finest_level(ms)) if ms else info.get("pixel_size_nm")
    labels = {name: a for name in classes if (a := _array(p / "labels" / name / "0")) is not None}
    image = _array(p / "0") if info.get("image") else None
    status = info.get("status") or "incomplete"
    pixel = tuple(pixel) if pixel else None
    return Scene(p, status, image, labels, classes, pixel, ngff=status == "complete" and ms is not None)


def _output_of_work_store(path: Path) -> Scene:
    from .run.store import WorkStore

    out = ((WorkStore(path).read_run() or {}).get("config") or {}).get("out")
    if not out:
        raise UserError(f"{path} is a run's work store that names no output; view the run's --out instead")
    if not Path(out).exists():
        raise UserError(f"{path} is the work store of a run whose output {out} is not there (yet, or from here); "
                        "view the run's --out instead")  # fmt: skip
    return open_scene(out)


class FileServer:
    """A folder over HTTP at ``bind``:``port`` (0: a free one), from a thread of this process, until ``close``:
    served by neuroglancer's static file handler (tornado's ``StaticFileHandler``: byte ranges, which the shard
    index of a zarr v3 output is read with, and the CORS answers the viewer's page on another port needs), on the
    port asked for."""

    def __init__(self, root: Path, bind: str = "127.0.0.1", port: int = 0):
        from urllib.parse import urlparse

        self.server = _static_files(str(root), bind, port)
        self.url = self.server.url
        self.port = urlparse(self.url).port

    def close(self) -> None:
        self.server.stop()


def _static_files(root: str, bind: str, port: int):
    """neuroglancer's ``StaticFileServer`` (which always takes a free port) on ``port``, without its access log (the
    viewer probes for files that need not exist: zarr v2 metadata in a v3 output)."""
    import logging

    import tornado.httpserver
    import tornado.netutil
    import tornado.web
    from neuroglancer.static_file_server import CorsStaticFileHandler, StaticFileServer

    class OnPort(StaticFileServer):
        def _attempt_to_start_server(self):
            app = tornado.web.Application([(r"/(.*)", CorsStaticFileHandler, {"path": self.static_dir})])
            self.http_server = tornado.httpserver.HTTPServer(app)
            sockets = tornado.netutil.bind_sockets(port=port, address=self.bind_address)
            self.http_server.add_sockets(sockets)
            self.url = f"http://{self.bind_address}:{sockets[0].getsockname()[1]}"

    logging.getLogger("tornado.access").setLevel(logging.ERROR)
    return OnPort(root, bind_address=bind, daemon=True)


@dataclass
class Served:
    """A neuroglancer viewer of a scene, and the server of the output's files where it reads them over HTTP."""

    viewer: object
    files: FileServer | None

    @property
    def url(self) -> str:
        return self.viewer.get_viewer_url()

    @property
    def ports(self) -> list[int]:
        """What a browser elsewhere needs forwarded (ssh -L): the viewer's port, and the files' where served."""
        from urllib.parse import urlparse

        return [urlparse(self.url).port] + ([self.files.port] if self.files else [])

    def close(self) -> None:
        if self.files:
            self.files.close()


def neuroglancer_viewer(scene: Scene, bind: str = "127.0.0.1", port: int = 0) -> Served:
    """A neuroglancer viewer of ``scene``, served from this process at ``bind``:``port`` (0: a free port): the image,
    then one segmentation layer per class in its preview colour, at the volume's middle. A finished output is read
    by the browser from its files (served at ``bind``, ``port`` + 1 where ``port`` is given): its pyramids, chunk by
    chunk, zarr v2 or v3. Anything else (a run still writing, an input volume) is read here, window by window
    (LocalVolume, level 0)."""
    try:
        import neuroglancer
    except ImportError as e:
        raise UserError("viewing needs neuroglancer: pip install 'cellseg-batch[view]' (or pip install neuroglancer)") from e

    neuroglancer.set_server_bind_address(bind, port)
    try:
        viewer = neuroglancer.Viewer()
        files = FileServer(scene.path, bind, port + 1 if port else 0) if scene.ngff else None
    except OSError as e:
        raise UserError(f"port {port} or {port + 1} is in use ({e.strerror}); choose another --port") from e
    scales, units = (list(scene.pixel_size_nm), "nm") if scene.pixel_size_nm else ([1, 1, 1], "")
    zyx = neuroglancer.CoordinateSpace(names=["z", "y", "x"], units=units, scales=scales)

    def source(group: str, array, kind: str):
        if files:  # zarr v3 (NGFF 0.5) named as such: neuroglancer would look for v2 metadata first
            return f"{'zarr3' if (scene.path / 'zarr.json').exists() else 'zarr'}://{files.url}/{group}"
        return neuroglancer.LocalVolume(array, dimensions=zyx, volume_type=kind)

    arrays = [a for a in [scene.image, *scene.labels.values()] if a is not None]
    with viewer.txn() as s:
        # x, y, z: the first two are the main panel's axes, so slices are seen face on
        s.dimensions = neuroglancer.CoordinateSpace(names=["x", "y", "z"], units=units, scales=scales[::-1])
        if arrays and not files:  # files: neuroglancer centres on the bounds their metadata give (--slices: z0..z1)
            z, y, x = arrays[0].shape
            s.position = [x / 2, y / 2, z // 2 + 0.5]
        if scene.image is not None:
            s.layers["image"] = neuroglancer.ImageLayer(source=source("", scene.image, "image"))
        for name, array in scene.labels.items():
            s.layers[name] = neuroglancer.SegmentationLayer(source=source(f"labels/{name}/", array, "segmentation"),
                                                            segment_default_color=scene.colour(name))  # fmt: skip
        s.layout = "4panel"
    return Served(viewer, files)


def require_napari() -> None:
    """A one-line error where napari or its OME-Zarr plugin is not installed."""
    missing = [package for package, module in (("napari", "napari"), ("napari-ome-zarr", "napari_ome_zarr"))
               if importlib.util.find_spec(module) is None]  # fmt: skip
    if missing:
        raise UserError(f"--napari needs {' and '.join(missing)}: pip install 'cellseg-batch[napari]' "
                        "(or leave out --napari for neuroglancer)")  # fmt: skip


def open_napari(scene: Scene) -> None:
    """napari with the napari-ome-zarr plugin (a finished output); else the scene's arrays as napari layers."""
    require_napari()
    import napari

    viewer = napari.Viewer(title=str(scene.path))
    if scene.ngff:  # a --no-image output's label images are found from its labels/ group (its root is no image)
        viewer.open(str(scene.path if scene.image is not None else scene.path / "labels"), plugin="napari-ome-zarr")
    else:
        scale = scene.pixel_size_nm or (1, 1, 1)
        if scene.image is not None:
            viewer.add_image(scene.image, name="image", scale=scale)
        for name, array in scene.labels.items():
            viewer.add_labels(array, name=name, scale=scale)
    napari.run()


def view(path: str | Path, napari: bool = False, port: int = 0, timeout: float | None = None) -> int:
    """``cellseg-batch view``: open ``path`` and serve it until Ctrl-C (or ``timeout`` seconds)."""
    if napari:
        require_napari()
    scene = open_scene(path)
    print(scene.describe(), flush=True)
    if napari:
        open_napari(scene)
        return 0
    served = neuroglancer_viewer(scene, port=port)
    print(f"neuroglancer: {served.url}", flush=True)
    ports = " and ".join(map(str, served.ports))
    print(f"serving on 127.0.0.1 only, port {ports}; Ctrl-C to stop" + (" (reload the page for what the run wrote "
          "since)" if scene.status == "incomplete" else ""), flush=True)  # fmt: skip
    end = None if timeout is None else time.monotonic() + timeout
    try:
        while end is None or time.monotonic() < end:
            time.sleep(0.2 if end else 1.0)
    except KeyboardInterrupt:
        print("stopped", flush=True)
    finally:
        served.close()
    return 0
