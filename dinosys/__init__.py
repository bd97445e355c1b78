"""dinosys: visual foundation models end to end (curate, pretrain, distill, evaluate, export)."""

__version__ = "0.1.0"
