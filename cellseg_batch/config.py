"""Run options: the one home of `run`'s defaults, and the parsers of values that several sub-commands share."""

from __future__ import annotations

import math
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .errors import UserError
from .write import layer_name


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
    border_fill: bool = True
    link: str = "overlap"
    link_iou: float = 0.25
    link_ioa: float = 0.5
    link_gap: str = "2"
    min_voxels: str | None = None
    min_slices: str | None = "auto"  # one-slice specks dropped where the class spans many slices (link._clean_up)
    slices: str | None = None
    pixel_size: str | None = None
    rescale: bool = False
    normalization: str | None = None
    invert: bool = False
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


# RunConfig's fields that an option turns off, and that option (the others are --FIELD-NAME)
OFF_OPTIONS = {"border_fill": "--no-border-fill", "write_image": "--no-image", "progress": "--no-progress"}


def option_change(name: str, before, now) -> str:
    """How the user changed field ``name`` of RunConfig, in the options they type: ``--tile 64 -> 128``,
    ``--no-image given``, ``--amp left out``."""
    if isinstance(now, bool) and isinstance(before, bool):
        option = OFF_OPTIONS.get(name, f"--{name.replace('_', '-')}")
        return f"{option} {'given' if now != (name in OFF_OPTIONS) else 'left out'}"
    return f"--{name.replace('_', '-')} {before!r} -> {now!r}"


def parse_floats(text: str, n: int, option: str) -> tuple[float, ...]:
    """``"40,10,10"`` -> (40.0, 10.0, 10.0): exactly ``n`` finite numbers, else a UserError naming ``option``."""
    try:
        values = tuple(float(v) for v in str(text).split(","))
    except ValueError:
        values = ()
    if len(values) != n or not all(math.isfinite(v) for v in values):
        raise UserError(f"{option} {text!r}: give {n} comma-separated numbers")
    return values


MIN_PIXEL_NM = 0.05  # nm: half an angstrom, below the finest cryo-EM pixel


def parse_pixel_size(text: str, option: str = "--pixel-size") -> tuple[float, float, float]:
    """``"Z,Y,X"`` in nm: three positive numbers."""
    size = parse_floats(text, 3, option)
    if min(size) <= 0:
        raise UserError(f"{option} {text!r}: give Z,Y,X in nm, three positive numbers (e.g. 40,10,10)")
    if min(size) < MIN_PIXEL_NM:  # below an atom's size: micrometres typed where nanometres are asked
        raise UserError(f"{option} {text!r}: sizes are in nm and {min(size):g} nm is below any EM pixel; "
                        f"for micrometres multiply by 1000 (e.g. 0.04,0.01,0.01 um is 40,10,10)")  # fmt: skip
    return size  # type: ignore[return-value]


def parse_slices(text: str | None, nz: int | None, option: str = "--slices") -> tuple[int, int]:
    """``"START:STOP"`` (an empty part: 0, or ``nz``) -> (start, stop) within a volume of ``nz`` slices; None: all.
    With ``nz`` None only the syntax is checked (an empty STOP then stands for any)."""
    if not text:
        return 0, nz
    try:
        a, b = str(text).split(":")
        z0, z1 = int(a or 0), int(b) if b else (nz if nz is not None else int(a or 0) + 1)
    except ValueError:
        raise UserError(f"{option} {text!r}: give START:STOP, e.g. 0:100") from None
    if nz is None and not 0 <= z0 < z1:
        raise UserError(f"{option} {text!r}: give START:STOP with 0 <= START < STOP")
    if nz is not None and not 0 <= z0 < z1 <= nz:
        raise UserError(f"{option} {text!r} is outside the volume's {nz} slices; give START:STOP within 0:{nz}")
    return z0, z1


def parse_slice_list(text: str | None, nz: int | None, option: str = "--slices") -> list[int]:
    """``"0,10,20"``, ``"0:5,10:15,28"``: slices and START:STOP ranges (as ``parse_slices`` reads them), separated by
    commas -> their slices, sorted and de-duplicated; None or empty: all ``nz``. With ``nz`` None only the syntax is
    checked. For ``eval``: labs annotate a few slices of a volume, not always one range."""
    if not text:
        return list(range(nz or 0))
    out: set[int] = set()
    for part in str(text).split(","):
        if ":" in part:
            out.update(range(*parse_slices(part.strip(), nz, option)))
            continue
        try:
            z = int(part)
        except ValueError:
            raise UserError(f"{option} {text!r}: give slices and START:STOP ranges separated by commas, e.g. 0,10,20 "
                            "or 0:5,10:15,28") from None  # fmt: skip
        if z < 0:
            raise UserError(f"{option} {text!r}: slice {z} is negative; slices are numbered from 0")
        if nz is not None and z >= nz:
            raise UserError(f"{option} {text!r}: slice {z} is outside the volume's {nz} slices; give slices within "
                            f"0:{nz}")  # fmt: skip
        out.add(z)
    return sorted(out)


def format_slice_list(zs) -> str:
    """Sorted slices in ``parse_slice_list``'s syntax, contiguous runs as START:STOP: [0, 1, 2, 10] -> "0:3,10"."""
    return ",".join(f"{run[0]}:{run[-1] + 1}" if len(run) > 1 else str(run[0]) for run in slice_runs(zs))


def slice_runs(zs) -> list[list[int]]:
    """Sorted slices cut into runs of consecutive ones: [0, 1, 2, 10, 11] -> [[0, 1, 2], [10, 11]]."""
    runs: list[list[int]] = []
    for z in zs:
        if runs and z == runs[-1][-1] + 1:
            runs[-1].append(int(z))
        else:
            runs.append([int(z)])
    return runs


AUTO = -1  # a class minimum the data decides (``--min-slices auto``: ``link._clean_up``)


def parse_class_minimums(text: str | None, classes: list[str] | None, option: str,
                         most: int | None = None, auto: bool = False, default: str | None = None) -> tuple[int, ...]:  # fmt: skip
    """``"N"`` (every class) or ``"CLASS=N,CLASS=N"`` (a plain N among them: the other classes) -> one int in
    [0, most] per class; a class not given takes the option's ``default`` (0 where None: `--link-gap
    mitochondrion=0` turned the gap edges of every other class off too); with ``auto``, N may be ``auto``
    (``AUTO``); with ``classes`` None only the syntax is checked."""
    if text is None or str(text) == "":
        return tuple(0 for _ in classes or ())
    if default is not None and classes is not None and "=" in str(text) and not any(
            "=" not in part for part in str(text).split(",")):  # fmt: skip
        text = f"{text},{default}"  # the classes not named keep the default
    n_is = f"a whole number from 0{f' to {most}' if most else ''}{' or auto' if auto else ''}"
    usage = f"{option} {text!r}: give N or CLASS=N,CLASS=N (N {n_is})"
    out: dict[str | None, int] = {}
    for part in str(text).split(","):
        name, sep, value = (s.strip() for s in part.rpartition("="))
        is_auto = auto and value.lower() == "auto"
        try:
            n = AUTO if is_auto else int(value)
        except ValueError:
            raise UserError(usage) from None
        if (n < 0 and not is_auto) or (most is not None and n > most) or (sep and not name) or (name if sep else None) in out:
            raise UserError(usage)
        out[(layer_name(name, option) if name else name) if sep else None] = n
    if classes is None:
        return ()
    unknown = sorted(k for k in out if k is not None and k not in classes)
    if unknown:
        raise UserError(f"{option}: unknown class {unknown[0]!r}; the run's classes are {', '.join(classes)}")
    return tuple(out.get(c, out.get(None, 0)) for c in classes)


@dataclass(frozen=True)
class Bound:
    """An option's range: ``low`` and ``high`` inclusive (None: no limit), ``low`` excluded where ``above``; 0 also
    holds where ``zero`` names what 0 means (``--tile 0``: whole slices)."""

    low: float | None = None
    high: float | None = None
    above: bool = False
    zero: str = ""

    def holds(self, value) -> bool:  # NaN and infinities hold nowhere
        if self.zero and value == 0:
            return True
        return math.isfinite(value) and (self.low is None or (value > self.low if self.above else value >= self.low)) and (
            self.high is None or value <= self.high
        )

    def __str__(self) -> str:
        if self.high is not None:
            text = f"must be in {'(' if self.above else '['}{self.low:g}, {self.high:g}]"
        else:
            text = f"give more than {self.low:g}" if self.above else f"give at least {self.low:g}"
        return f"{text}, or 0 ({self.zero})" if self.zero else text


_UNIT, _SHARE, _POSITIVE = Bound(0.0, 1.0, above=True), Bound(0.0, 1.0), Bound(0.0, above=True)
MIN_TILE = 16  # px: the smallest tile any sub-command cuts (a run's tile grid refuses smaller ones too)

# every sub-command's numeric options (argparse dests), by range: the one place they are checked
BOUNDS: dict[str, dict[str, Bound]] = {
    "run": {"stitch_iou": _UNIT, "link_iou": _UNIT, "link_ioa": _UNIT, "score_threshold": _SHARE, "batch_size": Bound(1),
            "tile": Bound(MIN_TILE), "chunk": Bound(16), "overlap": Bound(0), "actors": Bound(1), "cpus_per_actor": Bound(1),
            "num_cpus": Bound(1), "num_gpus": Bound(0)},
    "convert": {"tile": Bound(MIN_TILE, zero="whole slices"), "every": Bound(1), "val_fraction": _SHARE},
    "train": {"num_gpus": Bound(0), "cpu_procs": Bound(1), "num_machines": Bound(1), "machine_rank": Bound(0),
              "max_iter": Bound(1), "max_minutes": _POSITIVE, "eval_period": Bound(0), "batch_size": Bound(1),
              "lr": _POSITIVE, "tile": Bound(MIN_TILE), "overlap": Bound(2), "crop": Bound(MIN_TILE, zero="whole images")},
    "synth": {"seed": Bound(0), "scale": _POSITIVE, "dropout": _SHARE, "shift": _SHARE},
    "demo": {"iterations": Bound(1)},
}  # fmt: skip


def parse_normalization(text: str, option: str = "--normalization") -> tuple[float, float]:
    """``"LOW,HIGH"``: the intensities mapped to 0 and 255, HIGH above LOW."""
    low, high = parse_floats(text, 2, option)
    if high <= low:
        raise UserError(f"{option} {text!r}: give LOW,HIGH with HIGH above LOW")
    return low, high


# every sub-command's text options that have a syntax of their own, checked wherever a sub-command has them
SYNTAX = {
    "pixel_size": parse_pixel_size,
    "normalization": parse_normalization,
    "slices": lambda text: parse_slices(text, None),
    "link_gap": lambda text: parse_class_minimums(text, None, "--link-gap", most=3),
    "min_voxels": lambda text: parse_class_minimums(text, None, "--min-voxels"),
    "min_slices": lambda text: parse_class_minimums(text, None, "--min-slices", auto=True),
}


# a sub-command's own syntax of an option, in place of SYNTAX's: `eval --slices` also takes lists of slices
SYNTAX_OF = {"eval": {"slices": lambda text: parse_slice_list(text, None)}}


def check_options(command: str, values: dict) -> None:
    """Refuse, before anything is read or written, the options of ``command`` no input can make valid: the one
    validation layer of every sub-command (its values: argparse's namespace, or a config dataclass as a dict)."""
    for name, bound in BOUNDS.get(command, {}).items():
        value = values.get(name)
        if value is not None and not bound.holds(value):
            raise UserError(f"--{name.replace('_', '-')} {value}: {bound}")
    for name, parse in {**SYNTAX, **SYNTAX_OF.get(command, {})}.items():
        if values.get(name) is not None:
            parse(values[name])


def check_run_config(cfg: RunConfig) -> None:
    """`run`'s checks: the shared ones (``check_options``) and its predictor and link choice."""
    from .predict import PREDICTORS  # imports the built-in predictors (light: detectron2 loads only when built)

    if ":" not in cfg.predictor and cfg.predictor not in PREDICTORS:  # MODULE:NAME is checked when imported
        raise UserError(f"--predictor {cfg.predictor!r}: unknown predictor; choose one of {', '.join(PREDICTORS)}")
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", cfg.device):  # torch's own names; anything else failed in the actors
        raise UserError(f"--device {cfg.device!r}: use auto, cpu or cuda (cuda:N for one GPU)")
    if cfg.link not in ("overlap", "none"):
        raise UserError(f"--link {cfg.link!r}: choose overlap or none")
    if cfg.overlap == 0:  # stitching matches the pixels neighbouring tiles share: without any, nothing is joined
        raise UserError("--overlap 0: neighbouring tiles would share no pixels, so every object that crosses a tile "
                        "border would be split; give an even overlap of at least 2 (or leave the model's default)")  # fmt: skip
    from .write import FORMATS

    if cfg.format not in FORMATS:
        raise UserError(f"--format {cfg.format!r}: choose one of {', '.join(FORMATS)}")
    check_options("run", asdict(cfg))


def check_output_folder(path: str | os.PathLike, option: str = "--out") -> None:
    """Refuse, before anything is read, an output folder that is a file or lies under one (it was a traceback
    once the inputs had been read)."""
    p = Path(path)
    for q in (p, *p.parents):
        if q.exists():
            if not q.is_dir():
                raise UserError(f"{option} {path}: {q} is a file; give a folder")
            return


def check_output_path(path: str, inputs: list[str], option: str = "--out") -> None:
    """Refuse an output (a folder a run creates, and replaces with --overwrite) that is a symbolic link, that lies
    inside one of the ``inputs``, or that holds one of them. Symbolic links above it are followed."""
    p = Path(path)
    if p.is_symlink():
        raise UserError(f"{option} {path} is a symbolic link (to {os.readlink(p)}); give the path it points to")
    real = p.resolve()
    for source in inputs:
        if not source or not Path(source).exists():  # synth:..., or a file whose absence is reported elsewhere
            continue
        s = Path(source).resolve()
        if real == s or s in real.parents:
            raise UserError(f"{option} {path} lies inside the input {source}; choose an {option} outside it")
        if real in s.parents:
            raise UserError(f"the input {source} lies inside {option} {path}, which a run replaces; choose another "
                            f"{option}")  # fmt: skip
