"""TrainConfig: the one description of a training job, shared by the CLI, the flows and tests."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from segcore.config import Frozen, label_names, split_names
from segcore.errors import ConfigError

U2_ARCHS = ("u2net", "u2netp", "u2net-rec", "u2netp-rec")


class AugmentConfig(Frozen):
    """Augmentation options (all applied on whole batches at once, on the training device)."""

    flips: bool = Field(True, description="random left-right mirror")
    rot90: bool = Field(True, description="random 0/90/180/270 degree rotation (with flips: all 8 "
                        "symmetries of the square). Turn it off when the labels are drawn with a "
                        "sub-pixel offset from the image, e.g. ISBI 2012 (half a pixel up): "
                        "rotated copies teach the model to centre its edges instead")
    elastic_sigma: float = Field(10.0, ge=0, description="px std of the 3x3 grid displacements; 0 = off")
    elastic_grid: int = Field(3, ge=2, le=16, description="control points per side over the patch "
                              "(used when elastic_spacing is unset)")
    elastic_spacing: int | None = Field(None, ge=8, description="px between control points, "
                                        "independent of the patch size: the paper's 3x3 grid over "
                                        "a 572 px tile is about 286; small patches then see a "
                                        "window of that smooth field instead of a squeezed grid")
    scale_jitter: float = Field(0.0, ge=0, lt=1, description="zoom in [1-s, 1+s]; 0 = off")
    brightness: float = Field(0.1, ge=0)
    contrast: float = Field(0.1, ge=0)
    gamma: float = Field(0.0, ge=0, lt=1, description="gamma in [1-g, 1+g]")
    hed_jitter: float = Field(0.0, ge=0, description="H&E stain jitter strength in HED space (RGB only)")


class TrainConfig(Frozen):
    """A training job. Exactly one of ``steps`` / ``minutes`` bounds it."""

    data: str = Field(description="folder with images/ + masks/ (or image/ + label/), or a Zarr pair")
    data_stems: str | None = Field(None, description="e.g. '0-24' or '0001-0250' or 'a,b,c'")
    val: str | None = Field(None, description="validation data (same forms as data)")
    val_stems: str | None = None
    arch: str = "unet"
    model_kwargs: dict[str, Any] = Field(default_factory=dict)
    in_channels: int | None = Field(None, ge=1, description="default: taken from the data")
    out_channels: int = Field(1, ge=1)
    patch: int = Field(256, ge=16)
    resize: int | None = Field(None, ge=16, description="resize every image to resize x resize first "
                               "(U2-Net's RescaleT); evaluation then predicts at this size")
    batch: int = Field(4, ge=1)
    steps: int | None = Field(None, ge=1)
    minutes: float | None = Field(None, gt=0)
    stop_after: int | None = Field(None, ge=1, description="end this invocation at this step "
                                   "(the schedule still follows steps/minutes); resume later")
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(1e-4, ge=0)
    warmup: int = Field(50, ge=0, description="warm-up steps (linear), then cosine to 0")
    grad_clip: float | None = Field(1.0, gt=0)
    ema: float | None = Field(None, gt=0, lt=1, description="keep an exponential moving average "
                              "of the weights (and BN statistics) with this decay, ramped up as "
                              "min(ema, (1+step)/(10+step)); checkpoints, validation and "
                              "evaluation then use the averaged weights")
    seed: int = 0
    class_map: dict[int, int] | Literal["binary", "instances", "instances-borders"] = Field(
        "binary", description="mask value -> class; 'binary' = {0:0, 255:1} (also {0,1}); "
        "'instances' = 0 -> 0, any id > 0 -> 1; 'instances-borders' = the same with a "
        "background line wherever two instances touch (boundary-aware target)")
    class_names: tuple[str, ...] = ("background", "foreground")
    fg_fraction: float = Field(0.0, ge=0, le=1, description="share of patches centred on foreground")
    augment: AugmentConfig = AugmentConfig()
    loss: Literal["bce+dice", "bce", "dice"] = "bce+dice"
    border_weight: bool = Field(False, description="U-Net paper's weight map (w0=10, sigma=5)")
    deep_supervision: bool | None = Field(None, description="default: on for u2 models")
    bf16: bool = Field(False, description="bf16 autocast on CPU (fast only with AMX-BF16; slower "
                       "than fp32 on AVX2-only CPUs). On CUDA, AMP is always on (bf16, or fp16 "
                       "with loss scaling where bf16 is unsupported)")
    channels_last: bool | None = Field(None, description="default: on for CUDA and for U-Net on "
                                       "CPU; off for U2-Net on CPU (measured 20% slower there)")
    device: str | None = Field(None, description="default: cuda if available, else cpu")
    threads: int | None = Field(None, ge=1, description="torch.set_num_threads on CPU")
    out: str = Field(description="checkpoint URI (local or s3://); .state.pt and .best are beside it")
    checkpoint_every: int = Field(500, ge=1)
    val_every: int = Field(250, ge=1)
    resume: str | None = Field(None, description="checkpoint URI to resume from (its .state.pt)")
    init: str | None = Field(None, description="start from this model's weights (a shipped "
                             "model's name, e.g. 'nuclei-he', or a checkpoint URI): fine-tuning. "
                             "Its architecture, normalisation and pixel size are kept")
    pixel_size: float | None = Field(None, gt=0)
    pixel_unit: str | None = None
    channels: tuple[str, ...] | None = Field(None, description="train on these channels, in "
                                             "this order: names ('B04,B03,B02', 'DAPI') or "
                                             "1-based band indices ('4,3,2'); recorded by name "
                                             "in the checkpoint where the images name them")
    channel_names: tuple[str, ...] | None = Field(None, description="names for the images' "
                                                  "channels (for files without names)")
    normalization: Literal["auto", "scale", "stats"] = Field(
        "auto", description="'scale': x/255 then the data's mean/std (8-bit images only); "
        "'stats': per-channel percentiles (clip) and mean/std measured on the training data, "
        "in raw units, for any dtype; 'auto': scale for 8-bit images, else stats")
    percentiles: tuple[float, float] = Field((0.5, 99.5), description="stats: the clipping "
                                             "percentiles, low and high")

    @field_validator("channels", "channel_names", mode="before")
    @classmethod
    def _split(cls, v):
        return split_names(v)

    @model_validator(mode="before")
    @classmethod
    def _background_first(cls, data: Any) -> Any:
        """``class_names`` may name only the foreground classes (segcore.config.label_names)."""
        if not isinstance(data, dict) or data.get("class_names") is None:
            return data
        names = tuple(split_names(data["class_names"]) or ())
        return {**data, "class_names": label_names(names, int(data.get("out_channels") or 1))}

    @model_validator(mode="after")
    def _check(self) -> TrainConfig:
        if (self.steps is None) == (self.minutes is None):
            raise ConfigError("give exactly one of steps or minutes (e.g. steps=2000 or minutes=15)")
        if self.resize is not None and self.patch > self.resize:
            raise ConfigError(f"patch {self.patch} must be <= resize {self.resize}")
        if self.init and self.resume:
            raise ConfigError("give init (a new run from a model's weights) or resume (continue "
                              "a run from its checkpoint), not both")
        lo, hi = self.percentiles
        if not 0 <= lo < hi <= 100:
            raise ConfigError(f"percentiles {self.percentiles}: need 0 <= low < high <= 100, "
                              "e.g. (0.5, 99.5)")
        return self

    def use_channels_last(self, device_type: str) -> bool:
        if self.channels_last is not None:
            return self.channels_last
        return device_type == "cuda" or self.arch not in U2_ARCHS

    @property
    def use_deep_supervision(self) -> bool:
        if self.deep_supervision is None:
            return self.arch in U2_ARCHS
        return self.deep_supervision
