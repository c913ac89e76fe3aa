"""Frozen, extra-forbidding pydantic models: the contract between the CLI, the flows and the library.

A flow parameter, a CLI invocation and a library call all build the same objects, so a typo in
any of them is refused at the boundary with the field's name.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator


class Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


Norm = Literal["batch", "group", "none"]
Padding = Literal["same", "valid"]


class ModelSpec(Frozen):
    """What to build: a registry name plus the builder's keyword arguments.

    ``kwargs`` are validated by the builder itself (unknown keys are refused there), so a spec
    saved in a checkpoint can always be rebuilt or refused with a clear message.
    """

    arch: str = Field(description="registry name, e.g. 'unet', 'u2netp'")
    in_channels: int = Field(3, ge=1, le=64)
    out_channels: int = Field(1, ge=1, le=256)
    kwargs: dict[str, Any] = Field(default_factory=dict)

    @field_validator("arch")
    @classmethod
    def _lower(cls, v: str) -> str:
        return v.strip().lower()


class Normalization(Frozen):
    """How raw pixels become model input: x' = (x / scale - mean) / std, per channel."""

    scale: float = Field(255.0, gt=0, description="divide raw values by this first (255 for uint8)")
    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)

    @field_validator("std")
    @classmethod
    def _positive(cls, v: tuple[float, ...]) -> tuple[float, ...]:
        if any(s <= 0 for s in v):
            raise ValueError(f"std values must be > 0, got {v}")
        return v


class InputContract(Frozen):
    """What a checkpoint expects of its input, carried inside the checkpoint."""

    channels: int = Field(3, ge=1)
    normalization: Normalization = Normalization()
    class_names: tuple[str, ...] = ("background", "foreground")
    pixel_size: float | None = Field(None, gt=0, description="pixel size trained at")
    pixel_unit: str | None = Field(None, description="'micrometer' or 'meter'")
