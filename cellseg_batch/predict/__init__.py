"""Predict: the predictor registry. A predictor turns tile windows into per-class instance label tiles."""

# Built-in predictors register themselves on import; detectron2 itself is imported only when one is built.
from . import detectron2_predictor, labels_predictor  # noqa: F401
from .base import (
    PREDICTORS,
    Plan,
    Predictor,
    PredictorSpec,
    TileLabels,
    build_predictor,
    given,
    paint_instances,
    register,
    resolve_predictor,
)

__all__ = ["PREDICTORS", "Plan", "Predictor", "PredictorSpec", "TileLabels", "build_predictor", "given", "paint_instances",
           "register", "resolve_predictor"]  # fmt: skip
