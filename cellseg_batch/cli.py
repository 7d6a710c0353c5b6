"""The command line: parses options and calls into the package; a user's mistake ends in one line and status 2."""

from __future__ import annotations

import argparse
import errno
import logging
import os
import shlex
import signal
import sys
from dataclasses import MISSING
from pathlib import Path

from . import __version__
from .config import OFF_OPTIONS, RunConfig, check_options, check_run_config, parse_slices
from .errors import UserError


def default(name: str):
    """RunConfig's default for field ``name``: the ``run`` options take theirs from there, where they are held."""
    f = RunConfig.__dataclass_fields__[name]
    return f.default_factory() if f.default is MISSING else f.default


UNWRITABLE = (errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOTDIR, errno.EISDIR, errno.EEXIST)


def _run(args) -> int:
    fields = RunConfig.__dataclass_fields__
    cfg = RunConfig(**{k: v for k, v in vars(args).items() if k in fields})
    check_run_config(cfg)
    from .report_html import cleanup_text
    from .run import run

    try:
        report = run(cfg)
    except UserError:
        raise
    except OSError as e:  # --out or --work-dir where this user cannot write, or a file where a folder goes
        if e.errno in UNWRITABLE and e.filename:
            raise UserError(f"cannot write {e.filename} ({e.strerror}); choose an --out and --work-dir in a folder you "
                            "can write, or once this one is writable again run the same command to resume") from e  # fmt: skip
        _raise_if_gone(cfg, e)
        raise
    except Exception as e:
        _raise_if_gone(cfg, e)
        raise
    out = Path(cfg.out)
    counts = report["counts"]["objects_per_class"]
    print(f"wrote {out} ({report['counts']['objects']} objects: "
          + ", ".join(f"{n} {c}" for c, n in counts.items()) + f") in {report['time_s']['total']:.1f} s")  # fmt: skip
    if dropped := cleanup_text(report["counts"]):
        print(f"  {dropped}")
    print(f"  labels   {out}/labels/<class>/0 (OME-Zarr)")
    print(f"  table    {out}/cellseg/objects.parquet (and .csv)")
    print(f"  report   {out}/cellseg/report.html (and report.json)")
    print(f"  preview  {out}/cellseg/preview.png")
    if report.get("tiff"):
        print(f"  tiff     {', '.join(report['tiff'])}")
    print(f"  look     cellseg-batch view {shlex.quote(str(out))}")  # a command to paste: a space in a path quoted
    return 0


def _raise_if_gone(cfg: RunConfig, error: Exception) -> None:
    """A run's failure explained by an input or the output deleted or moved while it ran (rm -rf OUT mid-run gave
    zarr's FileNotFoundError, or a KeyError where the output's attributes went, as a traceback)."""
    # the output counts where the run had begun it (its work store is there): an error before it was made is no sign
    started = Path(cfg.work_dir or f"{str(cfg.out).rstrip('/')}.work").exists()
    gone = [p for p in (cfg.out if started else None, cfg.volume, *(cfg.labels or []), cfg.model)
            if p and ":" not in p and not Path(p).exists()]  # fmt: skip
    if gone:
        raise UserError(f"{gone[0]} was deleted or moved while the run used it; put it back, or remove what is left "
                        f"of {cfg.out}, and run again") from error  # fmt: skip


def _synth(args) -> int:
    from .synth import write_linking_cases, write_synthetic

    if args.linking:
        paths = write_linking_cases(args.out, tuple(args.shape), seed=args.seed, dropout=args.dropout,
                                    shift=args.shift, overwrite=args.overwrite)  # fmt: skip
    else:
        paths = write_synthetic(args.out, tuple(args.shape), seed=args.seed, fmt=args.format, dtype=args.dtype,
                                scale=args.scale, overwrite=args.overwrite)  # fmt: skip
    for name, p in paths.items():
        print(f"  {name:8s} {p}")
    return 0


def _eval(args) -> int:
    import json

    from .evaluate import evaluate_paths, format_table, written

    for option, value, example in (("--json", args.json, "eval.json"), ("--errors-png", args.errors_png, "split.png")):
        if value and Path(value).is_dir():  # refused before minutes of scoring, not after
            raise UserError(f"{option} {value} is a folder; give a file in it, e.g. {Path(value) / example}")
    result = evaluate_paths(args.pred, args.gt, gt_classes=args.gt_classes, slices=args.slices, mode=args.mode,
                            errors_png=args.errors_png, pred_classes=args.pred_classes, gt_slices=args.gt_slices)  # fmt: skip
    for warning in result["warnings"]:
        print(f"cellseg-batch: warning: {warning}", file=sys.stderr)
    print(format_table(result))
    drawn = result.get("errors_png")
    if drawn:
        print(f"wrote {drawn['path']} (the worst split: {drawn['class']} gt {drawn['gt']})")
    elif args.errors_png and not result.get("errors_png_failed"):  # asked for a picture: say why there is none
        why = "--mode 2d finds no 3D splits" if args.mode == "2d" else "no ground-truth object is split"
        print(f"did not write {args.errors_png}: {why}")
    if args.json:
        with written(args.json, "--json") as path:
            path.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.json}")
    if result.get("errors_png_failed"):
        raise UserError(result["errors_png_failed"])
    return 0


def _train(args) -> int:
    from .model_dir import ModelDir
    from .train import TrainConfig, train

    fields = TrainConfig.__dataclass_fields__
    out = train(TrainConfig(**{k: v for k, v in vars(args).items() if k in fields}))
    model = ModelDir.load(out)
    print(f"wrote model directory {out}: classes {', '.join(model.classes)}; run's tile {model.tile} px, overlap "
          f"{model.overlap} (use it with: cellseg-batch run VOLUME --model {out} --out OUT.zarr)")
    if stopped := model.training.get("stopped_by_signal"):
        again = ("submit the job again with --resume in its train arguments" if os.environ.get("SLURM_JOB_ID") else
                 "run the same command with --resume")  # fmt: skip
        print(f"cellseg-batch: {stopped}: training stopped at iteration {model.training['last_iter']}, its checkpoint "
              f"saved; {again} to continue", file=sys.stderr)  # fmt: skip
        return 130
    return 0


def _convert(args) -> int:
    from .coco import labels_to_coco, output_to_coco_display, output_volume
    from .read import check_label_stack, ngff_label_layers, open_label_layers, open_volume

    first = 0  # the volume slice of the labels' slice 0: a run of part of its volume (run --slices) starts later
    display = None  # the images' own pixels
    if args.direction == "labels-to-coco":
        volume = open_volume(args.volume)
        layers = open_label_layers(([args.labels] if args.labels else []) + args.more_labels, args.classes)
        polygons = args.polygons
    else:  # output-to-coco: a run's labels over its own image copy
        layers = ngff_label_layers(args.output)
        if layers is None:
            raise UserError(f"{args.output} is not a cellseg-batch output (no labels/ group)")
        volume, first = output_volume(args.output, args.volume, layers[0].volume.shape[0])
        polygons = not args.rle
        display = output_to_coco_display(args.output, volume)
    for layer in layers:
        if layer.volume.shape != volume.shape:
            raise UserError(f"{layer.volume.path} has shape {layer.volume.shape}, the volume {volume.shape}")
        if args.direction == "labels-to-coco":  # as `run --predictor labels` refuses it: one instance per piece
            check_label_stack(layer)
    z0, z1 = parse_slices(args.slices, first + volume.shape[0]) if args.slices else (first, first + volume.shape[0])
    if z0 < first:
        raise UserError(f"--slices {args.slices}: {args.output} holds slices {first}:{first + volume.shape[0]} of its "
                        "volume (run --slices)")  # fmt: skip
    paths = labels_to_coco(volume, layers, args.out, tile=args.tile, slices=range(z0 - first, z1 - first, args.every),
                           val_fraction=args.val_fraction, polygons=polygons, overwrite=args.overwrite,
                           z_offset=first, display=display)  # fmt: skip
    for name, p in paths.items():
        print(f"  {name:7s} {p}")
    if display is not None:
        print(f"  the {volume.dtype} images as 8-bit PNGs, {display.low:g}..{display.high:g} stretched to "
              f"{'255..0' if display.invert else '0..255'} as the run stretched them (annotation tools show 8-bit)")
    return 0


def _demo(args) -> int:
    from .demo import demo

    demo(args.out, iterations=args.iterations)
    return 0


def _view(args) -> int:
    from .view import view

    return view(args.path, napari=args.napari, port=args.port, timeout=args.timeout)


def _doctor(args) -> int:
    from .doctor import report

    print(report())
    return 0


def _shape(text: str) -> list[int]:
    try:
        shape = [int(v) for v in text.lower().replace("x", ",").split(",")]
    except ValueError:
        shape = []
    if len(shape) != 3 or min(shape) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: give Z,Y,X (e.g. 24,512,512)")
    return shape


class _Parser(argparse.ArgumentParser):
    """argparse, whose usage errors are one line like every other error (its sub-parsers are made of it too)."""

    def error(self, message: str):
        extra = message.split(": ", 1)[1].split() if message.startswith("unrecognized arguments: ") else []
        if extra and all(Path(a).exists() for a in extra):  # a glob the shell expanded into many files
            raise UserError(f"{message}: quote a file pattern ('slices/*.tif') so that the shell passes it whole, "
                            f"or give the folder (see {self.prog} --help)")  # fmt: skip
        raise UserError(f"{message} (see {self.prog} --help)")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="cellseg-batch", description=__doc__.split(";")[0])
    p.add_argument("--version", action="version", version=f"cellseg-batch {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    r = sub.add_parser("run", help="segment a volume into 3D instances (OME-Zarr labels, object table, report)")
    r.add_argument("volume", help="TIFF/BigTIFF/OME-TIFF, zarr array, OME-Zarr image, HDF5 (file.h5[/dataset]), N5 "
                   "(vol.n5[/dataset]), MRC, .npy, a folder (or quoted glob pattern) of 2D .tif/.png slices, or "
                   "synth:ZxYxX[,seed=N]")
    r.add_argument("-o", "--out", required=True, help="output OME-Zarr directory, e.g. volume.seg.zarr")
    r.add_argument("--predictor", help="detectron2 or labels (default %(default)s)")
    r.add_argument("--model", help="model directory (from `cellseg-batch train`)")
    r.add_argument("--labels", action="append", help="labels predictor: a 2D instance label stack "
                   "(any volume format above), or an OME-Zarr with a labels/ group; repeat for classes that nest")  # fmt: skip
    r.add_argument("--classes", action="append", help="after each plain --labels stack: a class "
                   "name, or a JSON file (or the JSON itself) mapping its ids to class names")  # fmt: skip
    g = r.add_argument_group("tiles and model")
    g.add_argument("--tile", type=int, help="tile size in pixels (default: the model's; labels: 1024)")
    g.add_argument("--overlap", type=int, help="tile overlap in pixels, even (default: the model's; labels: 32)")
    g.add_argument("--batch-size", type=int, help="tiles per forward pass (default %(default)s)")
    g.add_argument("--device", help="auto, cpu or cuda (default %(default)s)")
    g.add_argument("--score-threshold", type=float, help="minimum detection score (default: the model config's)")
    g.add_argument("--amp", action="store_true", help="mixed precision: float16 on GPUs, bfloat16 on CPUs that have it "
                   "(faster; masks may differ by a pixel)")
    g.add_argument("--exclusive", action="append", help="classes that never share a pixel, A,B,C (repeat for "
                   "more groups): the highest-scoring detection wins across them; none: no class excludes another "
                   "(default: the model's, found in its training annotations)")  # fmt: skip
    g.add_argument("--normalization", help="fixed intensities LOW,HIGH mapped to 0,255 (default: volume percentiles)")
    g.add_argument("--invert", action="store_true", help="the volume's contrast is the opposite of the training "
                   "images' (dark membranes on light in one, light on dark in the other): give the model its negative")
    g.add_argument("--pixel-size", help="Z,Y,X in nm (default: from the file, else the model's)")
    g.add_argument("--rescale", action="store_true", help="resize tiles to the model's pixel size before the model "
                   "(its instances come back at the volume's pixels); --tile and --overlap stay in volume pixels")
    g = r.add_argument_group("merging")
    g.add_argument("--stitch-iou", type=float, help="IoU in the shared window to merge tile instances "
                   "(default %(default)s)")  # fmt: skip
    g.add_argument(OFF_OPTIONS["border_fill"], dest="border_fill", action="store_false", help="keep each tile's core as "
                   "its model saw it, even where it missed an object its neighbour saw crossing their border")  # fmt: skip
    g.add_argument("--link", choices=["overlap", "none"], help="link slices into 3D, or not (default %(default)s)")
    g.add_argument("--link-iou", type=float, help="IoU to link instances of adjacent slices (default %(default)s)")
    g.add_argument("--link-ioa", type=float, help="overlap/own area for an unpaired instance to join "
                   "(default %(default)s)")  # fmt: skip
    g.add_argument("--link-gap", help="missing slices an instance without partner may skip (missed detections), "
                   "0 to 3: N, or CLASS=N,... (classes not named: N given alone, else the default) (default "
                   "%(default)s)")  # fmt: skip
    g.add_argument("--min-voxels", help="drop objects smaller than this: N, or CLASS=N,... (default: keep all)")
    g.add_argument("--min-slices", help="drop objects spanning fewer slices, except those in the first or last slice "
                   "(the volume cuts them): N, auto, or CLASS=N,... (classes not named: N given alone, else the "
                   "default); auto drops a class's one-slice objects where its objects span 3 or more slices (0: keep "
                   "all) (default %(default)s)")  # fmt: skip
    g = r.add_argument_group("input and output")
    g.add_argument("--slices", help="START:STOP, a range of slices")
    g.add_argument("--chunk", type=int, help="output chunk side in pixels, every level (default %(default)s); "
                   "independent of the tile grid")
    g.add_argument("--format", help="ngff-0.4 (zarr v2) or ngff-0.5 (zarr v3, sharded: a file per write block, "
                   "4096x4096 px of a slice, for object stores) (default %(default)s)")
    g.add_argument(OFF_OPTIONS["write_image"], dest="write_image", action="store_false", help="do not copy the image into OUT")
    g.add_argument("--export-tiff", action="store_true", help="also write one label TIFF per class, OUT/cellseg/labels_<class>.tif (small volumes)")
    g.add_argument("--overwrite", action="store_true", help="replace an existing output")
    g.add_argument("--work-dir", help="work store (default OUT.work); keep it on a filesystem all nodes see")
    g.add_argument("--keep-tiles", action="store_true", help="keep predicted tiles, to re-merge with --overwrite")
    g = r.add_argument_group("Ray")
    g.add_argument("--address", help="join this Ray cluster (e.g. auto) instead of starting a local one")
    g.add_argument("--actors", type=int, help="predictor actors (default: one per GPU; on CPUs, one per "
                   "--cpus-per-actor cores)")
    g.add_argument("--cpus-per-actor", type=int, help="CPU cores (torch threads) per actor (default: 1 for CPU "
                   "inference, up to 4 per GPU actor)")
    g.add_argument("--num-cpus", type=int, help="CPUs for the local Ray (default: all)")
    g.add_argument("--num-gpus", type=int, help="GPUs for the local Ray (default: all)")
    g.add_argument(OFF_OPTIONS["progress"], dest="progress", action="store_false", help="no progress bars")
    g.add_argument("-v", "--verbose", action="store_true", help="log more, show worker output")
    r.set_defaults(func=_run, **{k: default(k) for k in RunConfig.__dataclass_fields__ if k not in ("volume", "out")})

    s = sub.add_parser("synth", help="write a synthetic EM volume with ground truth (demo, tests, benchmarks)")
    s.add_argument("out", help="output folder")
    s.add_argument("--shape", type=_shape, default=[24, 512, 512], help="Z,Y,X (default 24,512,512)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--format", choices=["tif", "zarr"], default="tif")
    s.add_argument("--dtype", choices=["uint8", "uint16"], default="uint8")
    s.add_argument("--scale", type=float, default=1.0, help="object size factor")
    s.add_argument("--overwrite", action="store_true")
    s.add_argument("--linking", action="store_true", help="linking cases instead: Y-shaped (branching) mitochondria "
                   "and vessels, touching neighbours, leaning tubes; 2D detections in detections.tif")  # fmt: skip
    s.add_argument("--dropout", type=float, default=0.0, help="--linking: share of 2D detections deleted")
    s.add_argument("--shift", type=float, default=0.0, help="--linking: share of slices misaligned by a few px")
    s.set_defaults(func=_synth)

    e = sub.add_parser("eval", help="score predicted labels against ground truth")
    e.add_argument("pred", help="a cellseg-batch output (OME-Zarr with labels/), or another tool's label stack "
                   "with --pred-classes")
    e.add_argument("gt", help="ground truth: an OME-Zarr with labels/, or a label stack with --gt-classes")
    e.add_argument("--gt-classes", help="class name, or JSON mapping ids to class names, for a plain GT stack")
    e.add_argument("--pred-classes", help="class name, or JSON mapping ids to class names, for a plain PRED stack "
                   "(another tool's 3D segmentation, scored by its own ids)")
    e.add_argument("--slices", help="evaluate these slices only: START:STOP, or slices and ranges separated by commas "
                   "(e.g. 0,10,20 or 0:5,10:15,28: the slices a lab annotated); in 3d mode each run of consecutive "
                   "slices is scored as a sub-volume of its own")  # fmt: skip
    e.add_argument("--gt-slices", help="START:STOP: the volume's slices the ground truth holds, where it holds only "
                   "some (a truth file of a sub-range); the slices both hold are scored")
    e.add_argument("--mode", choices=["3d", "2d"], default="3d", help="2d: every slice on its own")
    e.add_argument("--json", help="also write the result as JSON here (with each class's splits and merges)")
    e.add_argument("--errors-png", help="draw the worst split (3d mode) as a PNG here")
    e.set_defaults(func=_eval)

    t = sub.add_parser("train", help="fine-tune Mask R-CNN on COCO annotations (detectron2 launch, GPUs or CPUs)")
    t.add_argument("--train", required=True, help="COCO JSON of the training annotations")
    t.add_argument("--images", required=True, help="folder of the images the COCO file names")
    t.add_argument("--val", help="COCO JSON for periodic evaluation (best checkpoint kept)")
    t.add_argument("--val-images", help="images folder for --val (default: --images)")
    t.add_argument("--config", required=True, help="detectron2 config, e.g. configs/em_mask_rcnn_R_50_FPN.yaml")
    t.add_argument("-o", "--out", required=True, help="model directory to write")
    t.add_argument("--weights", help="starting weights: a file, or a detectron2:// or https:// URL")
    t.add_argument("--num-gpus", type=int, default=0, help="GPU processes per machine")
    t.add_argument("--cpu-procs", type=int, default=1, help="without GPUs: CPU processes per machine (gloo)")
    t.add_argument("--num-machines", type=int, default=1)
    t.add_argument("--machine-rank", type=int, default=0)
    t.add_argument("--dist-url", default="auto", help="tcp://HEAD:PORT for several machines")
    t.add_argument("--resume", action="store_true", help="continue from the last checkpoint in OUT/train")
    t.add_argument("--max-iter", type=int, help="override SOLVER.MAX_ITER")
    t.add_argument("--max-minutes", type=float, help="stop after this much training time")
    t.add_argument("--eval-period", type=int, help="iterations between evaluations (default MAX_ITER/4)")
    t.add_argument("--batch-size", type=int, help="override SOLVER.IMS_PER_BATCH (all processes together)")
    t.add_argument("--lr", type=float, help="override SOLVER.BASE_LR")
    t.add_argument("--tile", type=int, help="tile size run should use (default: the training images' size, at most --crop)")
    t.add_argument("--overlap", type=int, help="tile overlap run should use (default: tile/8)")
    t.add_argument("--crop", type=int, help="images larger than this (px) are trained as random CROP x CROP windows "
                   "and validated as the windows that partition them (default: --tile, else 1024; 0: whole images)")
    t.add_argument("--pixel-size", help="Z,Y,X in nm of the training data (recorded in the model)")
    t.add_argument("--amp", action="store_true", help="mixed precision: float16 on GPUs, bfloat16 on CPUs that have "
                   "it (1.36x the iterations/s of float32 on this 2-core CPU)")  # fmt: skip
    t.add_argument("opts", nargs="*", default=[], help="more config overrides: KEY VALUE ...")
    t.set_defaults(func=_train)

    c = sub.add_parser("convert", help="label volumes or run outputs to COCO (training data, annotation tools)")
    csub = c.add_subparsers(dest="direction", required=True, metavar="{labels-to-coco,output-to-coco}")
    lc = csub.add_parser("labels-to-coco", help="a label volume and its image volume to COCO with image tiles")
    lc.add_argument("labels", nargs="?", help="label stack (or OME-Zarr with labels/); or use --labels")
    lc.add_argument("volume", help="the image volume the labels belong to")
    lc.add_argument("--labels", dest="more_labels", action="append", default=[], help="another label stack")
    lc.add_argument("--classes", action="append", default=[], help="class name or JSON map, per plain label stack")
    lc.add_argument("--polygons", action="store_true", help="polygons instead of RLE (for annotation tools)")
    oc = csub.add_parser("output-to-coco", help="a run's output to COCO polygons, for correction in a tool")
    oc.add_argument("output", help="a cellseg-batch output (OME-Zarr)")
    oc.add_argument("--volume", help="image volume (default: the image copy inside the output)")
    oc.add_argument("--rle", action="store_true", help="RLE masks instead of polygons")
    for sp in (lc, oc):
        sp.add_argument("-o", "--out", required=True, help="folder for images/ and train.json (val.json)")
        sp.add_argument("--tile", type=int, default=512, help="image tile size (0: whole slices) (default %(default)s)")
        sp.add_argument("--slices", help="START:STOP")
        sp.add_argument("--every", type=int, default=1, help="use every Nth slice")
        sp.add_argument("--val-fraction", type=float, default=0.0, help="share of slices written to val.json")
        sp.add_argument("--overwrite", action="store_true", help="replace the COCO set --out already holds")
        sp.set_defaults(func=_convert)

    m = sub.add_parser("demo", help="synthesize, train, run and evaluate on synthetic EM (CPU, minutes)")
    m.add_argument("out", nargs="?", default="demo", help="folder for everything the demo makes (default demo/)")
    m.add_argument("--iterations", type=int, default=720, help="training iterations (default 720)")
    m.set_defaults(func=_demo)

    v = sub.add_parser("view", help="look at a result (or a run still going, or an input volume) in neuroglancer")
    v.add_argument("path", help="a cellseg-batch output (OUT.zarr, finished or still being written; or the run's "
                   "--work-dir), or a volume")  # fmt: skip
    v.add_argument("--napari", action="store_true", help="open napari (with napari-ome-zarr) instead")
    v.add_argument("--port", type=int, default=0, help="port of the viewer on 127.0.0.1, and the next one for the "
                   "output's files (default: free ones)")  # fmt: skip
    v.add_argument("--timeout", type=float, help="stop serving after this many seconds (default: at Ctrl-C)")
    v.set_defaults(func=_view)

    d = sub.add_parser("doctor", help="versions, devices, Ray, detectron2 compiled ops")
    d.set_defaults(func=_doctor)
    return p


def _os_error_said(e: OSError, command: str | None) -> str | None:
    """A filesystem's refusal that reached the top as one line (None: not one a user can act on): a full disk or
    quota, a folder that cannot be written (convert's and train's --out on a read-only filesystem), a file deleted
    while in use."""
    where = f" ({e.filename})" if e.filename else ""
    again = {"run": "run the same command again to resume", "train": "run it again with --resume to continue"}.get(
        command or "", "run the same command again")  # fmt: skip
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return (f"no space left on the device{where} (or no inodes left: see df -i, or your quota); free some and "
                f"{again}")  # fmt: skip
    if e.errno in UNWRITABLE and e.filename:
        return f"cannot write {e.filename} ({e.strerror}); choose an --out in a folder you can write"
    if e.errno == errno.ENOENT and e.filename:
        return (f"{e.filename} was deleted or moved while cellseg-batch used it; put it back, or remove what is left "
                f"of the output, and {again}")  # fmt: skip
    return None


def _terminate(signum, frame):
    raise KeyboardInterrupt  # SIGTERM (scancel, kubectl delete) stops like Ctrl-C: cleanly, resumable


def main(argv: list[str] | None = None) -> int:
    signal.signal(signal.SIGTERM, _terminate)
    command = None
    try:
        args = build_parser().parse_args(None if argv is None else [str(a) for a in argv])
        command = args.command
        logging.basicConfig(level=logging.INFO if getattr(args, "verbose", False) else logging.WARNING,
                            format="%(levelname)s %(message)s")  # fmt: skip
        logging.getLogger("cellseg_batch").setLevel(logging.INFO)
        check_options(args.command, vars(args))  # every sub-command's options, before anything is read or written
        return args.func(args)
    except UserError as e:
        print(f"cellseg-batch: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        resumes = command == "run"  # the others start over
        again = "submit the same job again" if os.environ.get("SLURM_JOB_ID") else "run the same command again"
        print("cellseg-batch: interrupted" + (f"; {again} to resume" if resumes else ""), file=sys.stderr)
        return 130
    except OSError as e:
        said = _os_error_said(e, command)
        if said is None:
            raise
        print(f"cellseg-batch: error: {said}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        os._exit(141)


if __name__ == "__main__":
    sys.exit(main())
