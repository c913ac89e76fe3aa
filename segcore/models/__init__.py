"""Model zoo: explicit registry, U-Net, U2-Net family, checkpoints, receptive fields."""

from segcore.models.registry import (
    DESCRIPTIONS,
    REGISTRY,
    build_model,
    count_parameters,
    known_models,
)

__all__ = ["DESCRIPTIONS", "REGISTRY", "build_model", "count_parameters", "known_models"]
