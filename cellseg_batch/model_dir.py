"""The model directory: a trained model plus everything inference must match (classes, tile, scale, intensity).

    models/platelet/
        config.yaml       detectron2 config (the full, merged one)
        model_final.pth   weights (or the file named in cellseg.json)
        cellseg.json      classes (and which exclude one another), tile size and overlap, pixel size (nm),
                          normalization, training provenance
"""

from __future__ import annotations

import json
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path

from .errors import UserError

MANIFEST = "cellseg.json"
FORMAT = 1


@dataclass
class ModelDir:
    path: Path
    classes: list[str]
    tile: int
    overlap: int
    pixel_size_nm: list[float] | None = None  # (z, y, x) the model was trained at
    normalization: dict = field(default_factory=lambda: {"method": "percentile", "low": 1.0, "high": 99.5})
    config: str = "config.yaml"
    weights: str = "model_final.pth"
    training: dict = field(default_factory=dict)
    exclusive: list[list[str]] = field(default_factory=list)  # groups of classes that never share a pixel

    @property
    def config_path(self) -> Path:
        return self.path / self.config

    @property
    def weights_path(self) -> Path:
        return self.path / self.weights

    @classmethod
    def load(cls, path: str | Path) -> ModelDir:
        path = Path(path)
        manifest = path / MANIFEST
        if path.is_file():  # model_final.pth given for its folder
            raise UserError(f"--model {path} is a file; give the model directory that holds it ({path.parent})")
        if not path.is_dir():
            raise UserError(f"model directory {path} does not exist; train one with `cellseg-batch train` first")
        if not manifest.exists():
            raise UserError(f"{path} is not a cellseg-batch model directory: {MANIFEST} is missing")
        try:
            data = json.loads(manifest.read_text())
        except ValueError as e:
            raise UserError(f"{manifest} is not valid JSON ({e})") from e
        if data.get("format") != FORMAT:
            raise UserError(f"{manifest} has format {data.get('format')!r}; this version reads format {FORMAT}")
        data.pop("format")
        try:
            model = cls(path=path, **data)
        except TypeError as e:  # a key missing or unknown: name the keys, not the constructor's arguments
            known = [f.name for f in fields(cls) if f.name != "path"]
            needed = [f.name for f in fields(cls) if f.name != "path" and f.default is MISSING
                      and f.default_factory is MISSING]  # fmt: skip
            missing, unknown = [k for k in needed if k not in data], [k for k in data if k not in known]
            said = "; ".join(part for part in (f"missing {', '.join(missing)}" if missing else "",
                                               f"unknown {', '.join(unknown)}" if unknown else "") if part)  # fmt: skip
            raise UserError(f"{manifest} is malformed ({said or e}); it is written by `cellseg-batch train`") from e
        for f in (model.config_path, model.weights_path):
            if not f.exists():
                raise UserError(f"{f} is missing from the model directory")
        if not model.classes:
            raise UserError(f"{manifest} lists no classes")
        return model

    def save(self) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        data = {"format": FORMAT, **asdict(self)}
        data.pop("path")
        (self.path / MANIFEST).write_text(json.dumps(data, indent=2) + "\n")
