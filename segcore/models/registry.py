"""The model registry: an explicit ``name -> builder`` dict. No reflection, no import magic.

Each builder takes ``(in_channels, out_channels, **kwargs)`` and refuses keyword arguments it
does not know. ``build_model(spec)`` is the one way in.
"""

from __future__ import annotations

import difflib
import inspect
import os
import threading
import time
from collections.abc import Callable

from torch import nn

from segcore.config import ModelSpec
from segcore.errors import ConfigError, UnknownModelError
from segcore.models.blocks import NORMS, plain_conv, recurrent_conv
from segcore.models.u2net import U2NET_FULL, U2NET_SMALL, U2Net
from segcore.models.unet import UNet


def _check_norm(norm: str) -> str:
    if norm not in NORMS:
        raise ConfigError(f"norm {norm!r} must be one of {', '.join(NORMS)}")
    return norm


def _unet(in_channels: int, out_channels: int, depth: int = 4, width: int = 64,
          norm: str = "batch", padding: str = "same") -> nn.Module:
    return UNet(in_channels, out_channels, depth=depth, width=width, norm=norm, padding=padding)


class Pointwise(nn.Module):
    """A per-pixel linear classifier (one 1x1 convolution): receptive field 0, input multiple
    1, and a forward pass that costs next to nothing. Used to measure the pipeline's own work
    (read, decode, normalise, crop, write, digest, pyramid, preview) without the model.

    ``simulate_mpx_per_s`` > 0 makes it a simulated accelerator for the benchmarks: each
    forward also waits (GIL released, as a GPU's synchronise does) the time a device of that
    speed would take for the batch's pixels, one forward at a time on this host (a thread lock
    and an flock on one file: every thread and process of the host shares the one "device"),
    so the feed rate a pipeline reaches for a GPU of any speed is measured on a CPU machine."""

    input_multiple = 1

    def __init__(self, in_channels: int, out_channels: int, simulate_mpx_per_s: float = 0.0):
        super().__init__()
        if simulate_mpx_per_s < 0:
            raise ConfigError(f"simulate_mpx_per_s={simulate_mpx_per_s} must be >= 0")
        self.head = nn.Conv2d(in_channels, out_channels, 1)
        self.simulate_mpx_per_s = float(simulate_mpx_per_s)

    def forward(self, x):
        if self.simulate_mpx_per_s > 0 and x.device.type != "meta":
            _simulated_device_wait(x.shape[0] * x.shape[-2] * x.shape[-1] / 1e6
                                   / self.simulate_mpx_per_s)
        return self.head(x)


_SIM_LOCK = threading.Lock()


def _simulated_device_wait(seconds: float) -> None:
    """Hold the host's one simulated device for ``seconds`` (threads and processes queue)."""
    import fcntl
    import tempfile

    path = os.path.join(tempfile.gettempdir(), f"segcore-simulated-device-{os.getuid()}.lock")
    with _SIM_LOCK, open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            time.sleep(seconds)
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _pointwise(in_channels: int, out_channels: int,
               simulate_mpx_per_s: float = 0.0) -> nn.Module:
    return Pointwise(in_channels, out_channels, simulate_mpx_per_s)


def _u2(table, recurrent: bool):
    def build(in_channels: int, out_channels: int, norm: str = "batch", t: int = 2) -> nn.Module:
        _check_norm(norm)
        conv = recurrent_conv(norm, t) if recurrent else plain_conv(norm)
        return U2Net(table, in_channels, out_channels, conv=conv)

    return build


REGISTRY: dict[str, Callable[..., nn.Module]] = {
    "unet": _unet,
    "u2net": _u2(U2NET_FULL, recurrent=False),
    "u2netp": _u2(U2NET_SMALL, recurrent=False),
    "u2net-rec": _u2(U2NET_FULL, recurrent=True),
    "u2netp-rec": _u2(U2NET_SMALL, recurrent=True),
    "pointwise": _pointwise,
}

DESCRIPTIONS: dict[str, str] = {
    "unet": "U-Net (Ronneberger 2015); depth, width, norm, padding same|valid",
    "u2net": "U2-Net full (Qin 2020), residual U-blocks, 6 side outputs + fused",
    "u2netp": "U2-NetP small (Qin 2020)",
    "u2net-rec": "U2-Net with recurrent conv layers (R2U-Net style, t=2) inside each RSU",
    "u2netp-rec": "U2-NetP with recurrent conv layers (R2U-Net style, t=2) inside each RSU",
    "pointwise": "a per-pixel linear classifier (1x1 conv): the zero-cost model for I/O "
                 "benchmarks; simulate_mpx_per_s=R makes it a simulated R Mpx/s accelerator",
}


def known_models() -> list[str]:
    return sorted(REGISTRY)


def get_builder(name: str) -> Callable[..., nn.Module]:
    key = name.strip().lower()
    if key not in REGISTRY:
        close = difflib.get_close_matches(key, REGISTRY, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise UnknownModelError(
            f"unknown model {name!r}. Known models: {', '.join(known_models())}.{hint}"
        )
    return REGISTRY[key]


def build_model(spec: ModelSpec) -> nn.Module:
    builder = get_builder(spec.arch)
    allowed = set(inspect.signature(builder).parameters) - {"in_channels", "out_channels"}
    unknown = set(spec.kwargs) - allowed
    if unknown:
        raise ConfigError(
            f"model {spec.arch!r} does not take {', '.join(sorted(unknown))}; "
            f"it takes: {', '.join(sorted(allowed)) or 'no options'}"
        )
    model = builder(spec.in_channels, spec.out_channels, **spec.kwargs)
    model.spec = spec  # type: ignore[attr-defined]  # the contract travels with the module
    return model


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
