"""segcore: seam-free U-Net / U2-Net segmentation of scenes far too large for memory.

A pure library: models, IO, tiling, stitching, inference and training. It never imports
Prefect; the thin flows in ``flows/`` compose it.
"""

from segcore.errors import (
    CheckpointError,
    ConfigError,
    DataError,
    IncompleteResultError,
    InputError,
    SegcoreError,
    StorageError,
    UnknownModelError,
)

__version__ = "0.1.0"

__all__ = [
    "CheckpointError",
    "ConfigError",
    "DataError",
    "IncompleteResultError",
    "InputError",
    "SegcoreError",
    "StorageError",
    "UnknownModelError",
    "__version__",
]
