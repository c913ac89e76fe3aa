"""Frozen, extra-forbidding pydantic models: the contract between the CLI, the flows and the library.

A flow parameter, a CLI invocation and a library call all build the same objects, so a typo in
any of them is refused at the boundary with the field's name.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


def split_names(v: Any) -> Any:
    """'B04,B03,B02' -> ('B04', 'B03', 'B02'); ints -> their text (1-based band numbers);
    tuples/lists pass through (as text), None stays None. For ``channels`` fields."""
    if v is None:
        return None
    if isinstance(v, str):
        return tuple(t.strip() for t in v.split(","))
    if isinstance(v, int):
        return (str(v),)
    if isinstance(v, (list, tuple)):
        return tuple(str(t).strip() for t in v)
    return v


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
    """How raw pixels become model input, per channel.

    ``mode="scale"`` (every checkpoint before input statistics): x' = (x / scale - mean) / std.
    ``mode="stats"`` (statistics measured on the training data by ``segcore train``):
    x' = (clip(x, low, high) - mean) / std, all in raw pixel units (``scale`` is 1), where
    ``low``/``high`` are the ``percentiles`` of each channel and ``mean``/``std`` those of the
    clipped values; any dtype (uint8, uint16, float reflectance) then needs no hand-set scale.
    In both modes NaN values, and pixels whose every channel is the scene's nodata value, are
    filled with the channel mean (0 after normalisation) and marked nodata in the output.
    """

    mode: Literal["scale", "stats"] = "scale"
    scale: float = Field(255.0, gt=0, description="divide raw values by this first (255 for uint8)")
    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)
    low: tuple[float, ...] | None = Field(None, description="stats: clip below (raw units)")
    high: tuple[float, ...] | None = Field(None, description="stats: clip above (raw units)")
    percentiles: tuple[float, float] | None = Field(None, description="stats: the percentiles "
                                                    "low and high were measured at")

    @field_validator("std")
    @classmethod
    def _positive(cls, v: tuple[float, ...]) -> tuple[float, ...]:
        if any(s <= 0 for s in v):
            raise ValueError(f"std values must be > 0, got {v}")
        return v

    @model_validator(mode="after")
    def _stats_complete(self):
        if self.mode == "stats":
            n = len(self.mean)
            if self.low is None or self.high is None or self.scale != 1.0 or \
                    not len(self.std) == len(self.low) == len(self.high) == n:
                raise ValueError("stats normalisation needs scale 1 and low, high, mean and std "
                                 "with one value per channel each")
            if any(lo > hi for lo, hi in zip(self.low, self.high, strict=True)):
                raise ValueError(f"low {self.low} must be <= high {self.high} per channel")
        elif self.low is not None or self.high is not None:
            raise ValueError("low/high (clipping) belong to mode 'stats'")
        return self


class InputContract(Frozen):
    """What a checkpoint expects of its input, carried inside the checkpoint."""

    channels: int = Field(3, ge=1)
    normalization: Normalization = Normalization()
    class_names: tuple[str, ...] = ("background", "foreground")
    pixel_size: float | None = Field(None, gt=0, description="pixel size trained at")
    pixel_unit: str | None = Field(None, description="'micrometer' or 'meter'")
    channel_names: tuple[str, ...] | None = Field(
        None, description="the scene channels the model was trained on, in order (e.g. "
        "('B04', 'B03', 'B02') or ('DAPI',)); inference picks them by name where the scene "
        "names its channels. None: by position (checkpoints before channel names)")

    @model_validator(mode="after")
    def _names_match(self):
        if self.channel_names is not None and len(self.channel_names) != self.channels:
            raise ValueError(f"channel_names {self.channel_names} must name all {self.channels} "
                             "input channels")
        return self


def check_input_dtype(dtype: str, contract, src: str, model: str) -> None:
    """Refuse 16-bit or float pixels for a model whose normalisation divides by 255 (what
    ``segcore train`` records for 8-bit training data): its output would be meaningless."""
    n = contract.normalization
    if n.mode == "scale" and n.scale == 255.0 and dtype != "uint8":
        from segcore.errors import InputError

        raise InputError(
            f"{src}: holds {dtype} pixels but the model {model} was trained on 8-bit input "
            "(its normalisation divides by 255); convert the scene to 8 bits (e.g. "
            "gdal_translate -ot Byte -scale), or use a model trained on such data (segcore "
            "train --normalization stats)")


def label_names(names: tuple[str, ...] | list[str] | None, out_channels: int) -> tuple[str, ...]:
    """The name of every label a model's mask holds (index = label), 'background' first: a
    list naming only the foreground classes (``--class-names nucleus`` for a one-logit model)
    gets 'background' put in front, so label 1 reads 'nucleus' everywhere (mask, table,
    QuPath), not '1'."""
    names = tuple(names or ())
    n = 2 if out_channels == 1 else out_channels
    if names and len(names) == n - 1 and names[0].lower() != "background":
        return ("background", *names)
    return names
