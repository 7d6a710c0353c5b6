"""Run options: the one home of `run`'s defaults, and the parsers of values that several sub-commands share."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from .errors import UserError


@dataclass
class RunConfig:
    volume: str
    out: str
    predictor: str = "detectron2"
    model: str | None = None
    labels: list[str] = field(default_factory=list)
    classes: list[str] = field(default_factory=list)
    tile: int | None = None
    overlap: int | None = None
    batch_size: int = 4
    actors: int | None = None
    cpus_per_actor: int | None = None
    device: str = "auto"
    score_threshold: float | None = None
    amp: bool = False
    exclusive: list[str] | None = None  # None: the model directory's groups; ["none"]: no class excludes another
    stitch_iou: float = 0.5
    link: str = "overlap"
    link_iou: float = 0.25
    link_ioa: float = 0.5
    link_gap: str = "2"
    min_voxels: str | None = None
    min_slices: str | None = None
    slices: str | None = None
    pixel_size: str | None = None
    normalization: str | None = None
    write_image: bool = True
    chunk: int = 1024
    format: str = "ngff-0.4"
    export_tiff: bool = False
    overwrite: bool = False
    work_dir: str | None = None
    keep_tiles: bool = False
    address: str | None = None
    num_cpus: int | None = None
    num_gpus: int | None = None
    progress: bool = True
    verbose: bool = False


def parse_floats(text: str, n: int, option: str) -> tuple[float, ...]:
    """``"40,10,10"`` -> (40.0, 10.0, 10.0): exactly ``n`` finite numbers, else a UserError naming ``option``."""
    try:
        values = tuple(float(v) for v in str(text).split(","))
    except ValueError:
        values = ()
    if len(values) != n or not all(math.isfinite(v) for v in values):
        raise UserError(f"{option} {text!r}: give {n} comma-separated numbers")
    return values


def parse_pixel_size(text: str, option: str = "--pixel-size") -> tuple[float, float, float]:
    """``"Z,Y,X"`` in nm: three positive numbers."""
    size = parse_floats(text, 3, option)
    if min(size) <= 0:
        raise UserError(f"{option} {text!r}: give Z,Y,X in nm, three positive numbers (e.g. 40,10,10)")
    return size  # type: ignore[return-value]


def parse_slices(text: str | None, nz: int, option: str = "--slices") -> tuple[int, int]:
    """``"START:STOP"`` (an empty part: 0, or ``nz``) -> (start, stop) within a volume of ``nz`` slices; None: all."""
    if not text:
        return 0, nz
    try:
        a, b = text.split(":")
        z0, z1 = int(a or 0), int(b or nz)
    except ValueError:
        raise UserError(f"{option} {text!r}: give START:STOP, e.g. 0:100") from None
    if not 0 <= z0 < z1 <= nz:
        raise UserError(f"{option} {text!r} is outside the volume's {nz} slices; give START:STOP within 0:{nz}")
    return z0, z1


def parse_class_minimums(text: str | None, classes: list[str] | None, option: str,
                         most: int | None = None) -> tuple[int, ...]:  # fmt: skip
    """``"N"`` (every class) or ``"CLASS=N,CLASS=N"`` (a plain N among them: the other classes) -> one int in
    [0, most] per class (0 where not given); with ``classes`` None only the syntax is checked."""
    if text is None or str(text) == "":
        return tuple(0 for _ in classes or ())
    usage = f"{option} {text!r}: give N or CLASS=N,CLASS=N (N a whole number from 0{f' to {most}' if most else ''})"
    out: dict[str | None, int] = {}
    for part in str(text).split(","):
        name, sep, value = (s.strip() for s in part.rpartition("="))
        try:
            n = int(value)
        except ValueError:
            raise UserError(usage) from None
        if n < 0 or (most is not None and n > most) or (sep and not name) or (name if sep else None) in out:
            raise UserError(usage)
        out[name if sep else None] = n
    if classes is None:
        return ()
    unknown = sorted(k for k in out if k is not None and k not in classes)
    if unknown:
        raise UserError(f"{option}: unknown class {unknown[0]!r}; the run's classes are {', '.join(classes)}")
    return tuple(out.get(c, out.get(None, 0)) for c in classes)


def check_run_config(cfg: RunConfig) -> None:
    """Refuse, before anything is read or written, options no volume can make valid (one UserError line each)."""
    from .predict import PREDICTORS  # imports the built-in predictors (light: detectron2 loads only when built)

    if ":" not in cfg.predictor and cfg.predictor not in PREDICTORS:  # MODULE:NAME is checked when imported
        raise UserError(f"--predictor {cfg.predictor!r}: unknown predictor; choose one of {', '.join(PREDICTORS)}")
    for name in ("stitch_iou", "link_iou", "link_ioa"):
        value = getattr(cfg, name)
        if not 0.0 < value <= 1.0:
            raise UserError(f"--{name.replace('_', '-')} {value} must be in (0, 1]")
    if cfg.link not in ("overlap", "none"):
        raise UserError(f"--link {cfg.link!r}: choose overlap or none")
    from .write import FORMATS

    if cfg.format not in FORMATS:
        raise UserError(f"--format {cfg.format!r}: choose one of {', '.join(FORMATS)}")
    parse_class_minimums(cfg.link_gap, None, "--link-gap", most=3)
    parse_class_minimums(cfg.min_voxels, None, "--min-voxels")
    parse_class_minimums(cfg.min_slices, None, "--min-slices")
    minimum = {"batch_size": 1, "tile": 1, "chunk": 16, "overlap": 0, "actors": 1, "cpus_per_actor": 1, "num_cpus": 1, "num_gpus": 0}
    for name, low in minimum.items():
        value = getattr(cfg, name)
        if value is not None and value < low:
            raise UserError(f"--{name.replace('_', '-')} {value}: give at least {low}")
    if cfg.score_threshold is not None and not 0.0 <= cfg.score_threshold <= 1.0:
        raise UserError(f"--score-threshold {cfg.score_threshold} must be in [0, 1]")
    if cfg.normalization is not None:
        low, high = parse_floats(cfg.normalization, 2, "--normalization")
        if high <= low:
            raise UserError(f"--normalization {cfg.normalization!r}: give LOW,HIGH with HIGH above LOW")
    if cfg.pixel_size is not None:
        parse_pixel_size(cfg.pixel_size)
