"""Batched prediction: device choice, normalisation, AMP, channels_last, a per-process model
cache. The predictor is a callable loaded once per worker process, keyed by checkpoint URI;
it is never pickled into a task graph.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass, field

import numpy as np
import torch

from segcore.config import InputContract
from segcore.errors import ConfigError, InputError
from segcore.models.checkpoint import Checkpoint, load_checkpoint


def choose_device(device: str = "auto") -> torch.device:
    """'auto' -> cuda if present else cpu. In a GPU-pinned Dask worker CUDA_VISIBLE_DEVICES
    holds the worker's GPU first, so cuda:0 is that GPU."""
    if device == "auto":
        return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device {device!r} asked for but no CUDA GPU is visible; use --device cpu")
    if device not in ("cpu",) and not device.startswith("cuda"):
        raise ConfigError(f"device {device!r} must be auto, cpu or cuda[:N]")
    return torch.device(device)


def norm_affine(contract: InputContract, c: int) -> tuple[np.ndarray, np.ndarray]:
    """(a, b) float32 per channel with x' = x * a + b, the checkpoint's normalisation
    (x / scale - mean) / std folded into one multiply and one add."""
    n = contract.normalization
    mean = np.resize(np.asarray(n.mean, np.float64), c)
    std = np.resize(np.asarray(n.std, np.float64), c)
    a = (1.0 / (n.scale * std)).astype(np.float32)
    b = (-mean / std).astype(np.float32)
    return a, b


def norm_clip(contract: InputContract, c: int) -> tuple[np.ndarray, np.ndarray] | None:
    """(low, high) float32 per channel for a statistics contract (raw values are clipped to
    them before the affine), None for a fixed-scale one."""
    n = contract.normalization
    if n.mode != "stats" or n.low is None or n.high is None:
        return None
    return (np.resize(np.asarray(n.low, np.float32), c),
            np.resize(np.asarray(n.high, np.float32), c))


NODATA_LABEL = 255  # the mask value of pixels without data (never a class; COG nodata too)


def invalid_pixels(raw: np.ndarray, nodata: float | None) -> np.ndarray | None:
    """(..., h, w) bool: pixels whose every channel is NaN or the scene's ``nodata`` value, for
    (..., h, w, c) raw pixels; None when no pixel can be invalid (integer data, no nodata).
    Infinite values count as NaN: not data (they would spread through the receptive field)."""
    if raw.dtype.kind != "f" and nodata is None:
        return None
    bad = ~np.isfinite(raw) if raw.dtype.kind == "f" else np.zeros(raw.shape, bool)
    if nodata is not None and nodata == nodata:
        bad |= raw == nodata
    return bad.all(axis=-1)


def normalize(raw: np.ndarray, contract: InputContract,
              nodata: float | None = None) -> np.ndarray:
    """(h, w, c) raw pixels -> (c, h, w) float32 model input: clip (statistics contracts),
    x * a + b per channel, NaN values and nodata pixels filled with 0 (the channel mean): the
    same float32 arithmetic :meth:`Predictor.predict_raw` does on the device."""
    c = raw.shape[-1]
    a, b = norm_affine(contract, c)
    x = raw.astype(np.float32)
    nonfinite = ~np.isfinite(x) if raw.dtype.kind == "f" else None  # NaN and +-inf
    clip = norm_clip(contract, c)
    if clip is not None:
        np.clip(x, clip[0], clip[1], out=x)
    x *= a
    x += b
    if raw.dtype.kind == "f" or nodata is not None:
        fill = nonfinite if nonfinite is not None else np.zeros(x.shape, bool)
        bad = invalid_pixels(raw, nodata)
        if bad is not None:
            fill |= bad[..., None]
        x[fill] = 0.0
    return np.ascontiguousarray(x.transpose(2, 0, 1))


CPU_FEATURES_ENV = "SEGCORE_CPU_FEATURES"
# what SEGCORE_CPU_FEATURES may claim: the three kinds of CPU this project meets, each as the
# flags that matter to the precision choice (a superset of the previous kind)
CPU_KINDS: dict[str, frozenset[str]] = {
    "avx2": frozenset({"avx2", "fma"}),
    "avx512_bf16": frozenset({"avx2", "fma", "avx512f", "avx512_bf16"}),
    "amx": frozenset({"avx2", "fma", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16"}),
}
FAST_BF16_FLAGS = ("amx_bf16", "avx512_bf16")


def cpu_features_override() -> str | None:
    """The CPU kind ``SEGCORE_CPU_FEATURES`` names (avx2, avx512_bf16 or amx), or None when it
    is unset. It makes every run decide as that kind of CPU would (the suite runs under each in
    CI); it changes only the choice, so a claimed kind this CPU lacks is still correct, only
    slower (bf16 emulated). Anything else is refused, naming the variable."""
    raw = os.environ.get(CPU_FEATURES_ENV, "").strip().lower()
    if not raw:
        return None
    kind = {"amx_bf16": "amx", "avx512bf16": "avx512_bf16"}.get(raw, raw)
    if kind not in CPU_KINDS:
        raise ConfigError(f"{CPU_FEATURES_ENV}={raw!r} must be one of {', '.join(CPU_KINDS)} "
                          "(or unset, to detect this CPU's own flags)")
    return kind


def cpu_flags() -> set[str]:
    """The CPU feature flags this process can see (Linux /proc/cpuinfo; empty elsewhere), or
    those of the kind ``SEGCORE_CPU_FEATURES`` names."""
    kind = cpu_features_override()
    if kind is not None:
        return set(CPU_KINDS[kind])
    return detected_cpu_flags()


def detected_cpu_flags() -> set[str]:
    """This CPU's own flags, whatever ``SEGCORE_CPU_FEATURES`` says."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


@dataclass(frozen=True)
class Precision:
    """What ``--amp auto`` (or an explicit choice) resolved to on this device, and why."""

    amp: str  # 'none' | 'bf16' | 'fp16'
    channels_last: bool
    reason: str

    def as_dict(self) -> dict[str, object]:
        return {"amp": self.amp, "channels_last": self.channels_last, "reason": self.reason}


def choose_precision(dev: torch.device, amp: str = "auto",
                     channels_last: bool | None = None) -> Precision:
    """Resolve ``amp`` for ``dev``. 'auto': bf16 + channels_last on CUDA and on CPUs with
    native bf16 matrix instructions (AMX or AVX-512-BF16); fp32 + channels_last on other CPUs
    (there bf16 is emulated and runs several times slower than fp32, while channels_last alone
    halved U-Net's fp32 time on an AVX2 machine). Detected at run time, never assumed."""
    if amp not in ("auto", "none", "bf16", "fp16"):
        raise ConfigError(f"amp {amp!r} must be auto, none, bf16 or fp16")
    if amp == "fp16" and dev.type == "cpu":
        raise ConfigError("--amp fp16 needs a CUDA device; on CPU use --amp bf16 or none")
    cl = True if channels_last is None else channels_last
    if amp != "auto":
        return Precision(amp, cl, f"--amp {amp} asked for")
    if dev.type == "cuda":
        return Precision("bf16", cl, f"CUDA device {torch.cuda.get_device_name(dev)}: bf16")
    kind = cpu_features_override()
    flags = cpu_flags()
    fast = [f for f in FAST_BF16_FLAGS if f in flags]
    cap = torch.backends.cpu.get_cpu_capability()
    told = f", as {CPU_FEATURES_ENV}={kind} says" if kind else ""
    if fast:
        return Precision("bf16", cl, f"CPU has {'/'.join(fast)} (torch capability {cap}"
                                     f"{told}): bf16")
    return Precision("none", cl, f"CPU has no AMX/AVX-512-BF16 (torch capability {cap}{told}): "
                                 "fp32, where bf16 would be emulated and slower")


CPU_FORWARD_PIXELS = 1 << 20  # the most window pixels one CPU forward takes (see _cpu_slices)


@dataclass
class Predictor:
    """Logits -> probabilities for batches of windows, on one device.

    ``predict_raw`` takes raw pixels (B, h, w, c) in the scene's dtype and normalises them on
    the device (on CUDA the uint8 batch is what crosses the bus, from pinned memory, without
    blocking); ``__call__`` takes already normalised float32 (B, C, h, w). Both give
    (B, K, h, w) float32 probabilities and the same numbers for the same pixels.

    One batch at a time is on the device: the lanes of a process (threads running shard
    tasks side by side) share one predictor, and its lock queues their forwards, so the
    memory ``--tile auto`` budgets for is one forward's, and a CPU's cores go to one
    forward's intra-op threads instead of several forwards fighting over them, while the
    lanes' other work (decode, normalise, quantise, encode, digest, write) runs in parallel."""

    model: torch.nn.Module
    checkpoint: Checkpoint
    device: torch.device
    amp: str = "none"  # 'none' | 'bf16' | 'fp16'
    channels_last: bool = False
    compiled: bool = False
    reason: str = ""
    _norm: tuple | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    @property
    def contract(self) -> InputContract:
        return self.checkpoint.contract

    @property
    def precision(self) -> dict[str, object]:
        return {"amp": self.amp, "channels_last": self.channels_last, "compile": self.compiled,
                "device": str(self.device), "reason": self.reason}

    @property
    def n_classes(self) -> int:
        """Classes in the label output: 2 for a one-logit (sigmoid) model."""
        k = self.checkpoint.spec.out_channels
        return 2 if k == 1 else k

    def _probs(self, x: torch.Tensor) -> torch.Tensor:
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        else:
            x = x.contiguous()
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.amp)
        with self._lock, torch.inference_mode(), torch.autocast(
                self.device.type, dtype=dtype, enabled=dtype is not None):
            logits = self.model(x).float()
            return torch.sigmoid(logits) if logits.shape[1] == 1 else torch.softmax(logits, 1)

    def _forward(self, x: torch.Tensor) -> np.ndarray:
        return self._probs(x).contiguous().cpu().numpy()

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        """(B, C, h, w) float32 -> (B, K, h, w) float32 probabilities; K = out channels
        (sigmoid for one logit, softmax otherwise)."""
        return self._forward(torch.from_numpy(np.ascontiguousarray(batch)).to(self.device))

    def _norm_tensors(self, c: int) -> tuple[torch.Tensor, ...]:
        if self._norm is None or self._norm[0].shape[1] != c:
            a, b = norm_affine(self.contract, c)
            clip = norm_clip(self.contract, c)
            t = [torch.from_numpy(v.reshape(1, c, 1, 1)).to(self.device)
                 for v in (a, b, *(clip or ()))]
            self._norm = tuple(t)
        return self._norm

    def _input(self, raw: np.ndarray, nodata: float | None = None
               ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(model input, (B, h, w) bool of nodata pixels or None). Statistics contracts clip
        first; NaN values and pixels whose every channel is ``nodata`` become 0 (the mean)."""
        x = torch.from_numpy(np.ascontiguousarray(raw))
        if self.device.type == "cuda":
            x = x.pin_memory().to(self.device, non_blocking=True)
        a, b, *clip = self._norm_tensors(x.shape[-1])
        with torch.inference_mode():
            # (B, h, w, c) permuted is a channels_last view: float conversion keeps that layout
            x = x.permute(0, 3, 1, 2).to(torch.float32)
            bad = fill = None
            if raw.dtype.kind == "f" or nodata is not None:
                fill = ~torch.isfinite(x)  # NaN and +-inf: not data
                miss = fill if nodata is None or nodata != nodata else fill | (x == nodata)
                bad = miss.all(1)
                fill = fill | bad[:, None]
            if clip:
                x = torch.maximum(torch.minimum(x, clip[1]), clip[0])
            if bool((a == a.flatten()[0]).all()) and bool((b == b.flatten()[0]).all()):
                x = x.mul_(float(a.flatten()[0])).add_(float(b.flatten()[0]))  # 25% faster
            else:
                x = x.mul_(a).add_(b)
            if fill is not None:
                x = x.masked_fill_(fill, 0.0)
                if not bool(bad.any()):
                    bad = None
            return x, bad

    def _cpu_slices(self, raw: np.ndarray) -> list[slice] | None:
        """On the CPU a batch runs as forwards of at most CPU_FORWARD_PIXELS (one window of
        1024^2 or more): one core, U-Net w16 at 1024^2, four windows in one forward took
        2.66-2.78 s per window against 2.19-2.35 s one at a time, and the 1x1 model 36 against
        14-18 ms (the batch's tensors outgrow the caches and are page-faulted afresh). None on
        a GPU, where the batch is what fills the device."""
        if self.device.type != "cpu" or raw.shape[0] < 2:
            return None
        per = max(1, CPU_FORWARD_PIXELS // max(1, raw.shape[1] * raw.shape[2]))
        if per >= raw.shape[0]:
            return None
        return [slice(i, i + per) for i in range(0, raw.shape[0], per)]

    def predict_quantized(self, raw: np.ndarray, prob_dtype: str = "uint8",
                          nodata: float | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(B, h, w, c) raw pixels -> ((B, K, h, w) probabilities as stored, (B, h, w) uint8
        labels), both made on the device, so only the stored bytes come back: uint8 is
        round(p * 255) (half to even, as ``np.rint``), float16 is p rounded to half; labels
        are p >= 0.5 for one channel, else the argmax. Nodata pixels (NaN in every channel,
        or every channel equal to ``nodata``) get label ``NODATA_LABEL`` and probability 0."""
        parts = self._cpu_slices(raw)
        if parts is not None:
            outs = [self.predict_quantized(raw[s], prob_dtype, nodata) for s in parts]
            return (np.concatenate([q for q, _ in outs]),
                    np.concatenate([lab for _, lab in outs]))
        with torch.inference_mode():
            x, bad = self._input(raw, nodata)
            p = self._probs(x)
            labels = (p[:, 0] >= 0.5) if p.shape[1] == 1 else p.argmax(1)
            labels = labels.to(torch.uint8)
            if bad is not None:
                p = p.masked_fill_(bad[:, None], 0.0)
                labels = labels.masked_fill_(bad, NODATA_LABEL)
            q = torch.round(p * 255).to(torch.uint8) if prob_dtype == "uint8" else p.half()
            q, labels = q.contiguous().cpu(), labels.contiguous().cpu()
        return q.numpy(), labels.numpy()

    def predict_raw(self, raw: np.ndarray, nodata: float | None = None) -> np.ndarray:
        """(B, h, w, c) raw pixels -> (B, K, h, w) probabilities. The small integer batch is
        what is copied to the device (from pinned memory, without blocking, on CUDA); there it
        becomes float32 as ``x * a + b`` per channel, the arithmetic of :func:`normalize`.
        Nodata pixels (see :meth:`predict_quantized`) get probability 0; find them with
        :func:`invalid_pixels`."""
        parts = self._cpu_slices(raw)
        if parts is not None:
            return np.concatenate([self.predict_raw(raw[s], nodata) for s in parts])
        with torch.inference_mode():
            x, bad = self._input(raw, nodata)
            p = self._probs(x)
            if bad is not None:
                p = p.masked_fill_(bad[:, None], 0.0)
            return p.contiguous().cpu().numpy()


def labels_from_probs(probs: np.ndarray) -> np.ndarray:
    """(K, h, w) probabilities -> (h, w) uint8 class labels (threshold 0.5 for one channel)."""
    if probs.shape[0] == 1:
        return (probs[0] >= 0.5).view(np.uint8)
    return probs.argmax(axis=0).astype(np.uint8)


_CACHE: dict[tuple, Predictor] = {}
_LOCK = threading.Lock()


def get_predictor(model_uri: str, device: str = "auto", amp: str = "auto",
                  channels_last: bool | None = None, compile: bool = False) -> Predictor:
    """Load (once per process) the checkpoint at ``model_uri`` for ``device`` with the
    precision :func:`choose_precision` resolves; ``compile`` wraps the model in
    ``torch.compile`` (its first call per window shape compiles)."""
    dev = choose_device(device)
    prec = choose_precision(dev, amp, channels_last)
    key = (model_uri, str(dev), prec.amp, prec.channels_last, compile)
    with _LOCK:
        if key not in _CACHE:
            threads = os.environ.get("SEGCORE_TORCH_THREADS")
            if threads:
                torch.set_num_threads(int(threads))
            model, ckpt = load_checkpoint(model_uri, device=dev)
            if prec.channels_last:
                model = model.to(memory_format=torch.channels_last)
            if compile:
                model = torch.compile(model, dynamic=False)
            _CACHE[key] = Predictor(model, ckpt, dev, prec.amp, prec.channels_last, compile,
                                    prec.reason)
        return _CACHE[key]


class FunctionPredictor:
    """Any ``fn``: (B, C, h, w) float32 raw pixels -> (B, K, h, w) probabilities, as the shard
    loop's predictor (as MONAI's inferers take any callable): the real read, crop, quantise,
    write and record path driven by a function (tests use an affine one; a user's own model
    runs the same way). Quantising and labelling follow :meth:`Predictor.predict_quantized`
    (uint8 = rint(p * 255), labels p >= 0.5 or the argmax, nodata pixels 0 / NODATA_LABEL);
    no normalisation: ``fn`` gets the raw pixels as float32."""

    device = None

    def __init__(self, fn, in_channels: int, name: str = "function") -> None:
        self.fn, self.in_channels = fn, in_channels
        self.precision = {"amp": "none", "channels_last": False, "compile": False,
                          "device": name, "reason": "a function given as the predictor"}

    def predict_raw(self, raw: np.ndarray, nodata: float | None = None) -> np.ndarray:
        p = np.asarray(self.fn(np.ascontiguousarray(raw.transpose(0, 3, 1, 2),
                                                    dtype=np.float32)), np.float32)
        bad = invalid_pixels(raw, nodata)
        if bad is not None:
            p = np.where(bad[:, None], np.float32(0), p)
        return p

    def predict_quantized(self, raw: np.ndarray, prob_dtype: str = "uint8",
                          nodata: float | None = None) -> tuple[np.ndarray, np.ndarray]:
        p = self.predict_raw(raw, nodata)
        labels = (p[:, 0] >= 0.5) if p.shape[1] == 1 else p.argmax(1)
        labels = labels.astype(np.uint8)
        bad = invalid_pixels(raw, nodata)
        if bad is not None:
            labels[bad] = NODATA_LABEL
        q = np.rint(p * 255).astype(np.uint8) if prob_dtype == "uint8" else p.astype(np.float16)
        return q, labels


def check_channels(pred, channels: int, src: str) -> None:
    want = pred.in_channels if isinstance(pred, FunctionPredictor) else \
        pred.checkpoint.spec.in_channels
    if channels != want:
        raise InputError(
            f"{src}: has {channels} channel(s) but the model expects {want}; pick a scene with "
            f"{want} band(s) or a model trained on {channels}"
        )
