"""cellseg-batch: whole-volume EM instance segmentation (read -> tile -> predict -> stitch -> link -> write)."""

__version__ = "0.1.0"
