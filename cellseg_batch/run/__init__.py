"""The `run` job, as stages over a work store: predict -> stitch -> link -> write (-> pyramid), driven by one loop."""

from .job import Run, run

__all__ = ["Run", "run"]
