"""Batched prediction: device choice, normalisation, AMP, channels_last, a per-process model
cache. The predictor is a callable loaded once per worker process, keyed by checkpoint URI;
it is never pickled into a task graph.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass

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


def normalize(raw: np.ndarray, contract: InputContract) -> np.ndarray:
    """(h, w, c) raw pixels -> (c, h, w) float32 model input."""
    n = contract.normalization
    x = raw.astype(np.float32) / np.float32(n.scale)
    c = x.shape[-1]
    mean = np.resize(np.asarray(n.mean, np.float32), c)
    std = np.resize(np.asarray(n.std, np.float32), c)
    x = (x - mean) / std
    return np.ascontiguousarray(x.transpose(2, 0, 1))


@dataclass
class Predictor:
    """Logits -> probabilities for batches of normalised windows."""

    model: torch.nn.Module
    checkpoint: Checkpoint
    device: torch.device
    amp: str = "none"  # 'none' | 'bf16' | 'fp16'
    channels_last: bool = False

    @property
    def contract(self) -> InputContract:
        return self.checkpoint.contract

    @property
    def n_classes(self) -> int:
        """Classes in the label output: 2 for a one-logit (sigmoid) model."""
        k = self.checkpoint.spec.out_channels
        return 2 if k == 1 else k

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        """(B, C, h, w) float32 -> (B, K, h, w) float32 probabilities; K = out channels
        (sigmoid for one logit, softmax otherwise)."""
        x = torch.from_numpy(batch).to(self.device)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.amp)
        with torch.inference_mode(), torch.autocast(self.device.type, dtype=dtype,
                                                    enabled=dtype is not None):
            logits = self.model(x).float()
        probs = torch.sigmoid(logits) if logits.shape[1] == 1 else torch.softmax(logits, dim=1)
        return probs.cpu().numpy()


def labels_from_probs(probs: np.ndarray) -> np.ndarray:
    """(K, h, w) probabilities -> (h, w) uint8 class labels (threshold 0.5 for one channel)."""
    if probs.shape[0] == 1:
        return (probs[0] >= 0.5).astype(np.uint8)
    return probs.argmax(axis=0).astype(np.uint8)


_CACHE: dict[tuple[str, str, str, bool], Predictor] = {}
_LOCK = threading.Lock()


def get_predictor(model_uri: str, device: str = "auto", amp: str = "auto",
                  channels_last: bool | None = None) -> Predictor:
    """Load (once per process) the checkpoint at ``model_uri``. amp 'auto' = bf16 on CUDA,
    none on CPU (exactness tests run fp32)."""
    dev = choose_device(device)
    if amp == "auto":
        amp = "bf16" if dev.type == "cuda" else "none"
    if amp not in ("none", "bf16", "fp16"):
        raise ConfigError(f"amp {amp!r} must be auto, none, bf16 or fp16")
    cl = dev.type == "cuda" if channels_last is None else channels_last
    key = (model_uri, str(dev), amp, cl)
    with _LOCK:
        if key not in _CACHE:
            model, ckpt = load_checkpoint(model_uri, device=dev)
            if cl:
                model = model.to(memory_format=torch.channels_last)
            threads = os.environ.get("SEGCORE_TORCH_THREADS")
            if threads:
                torch.set_num_threads(int(threads))
            _CACHE[key] = Predictor(model, ckpt, dev, amp, cl)
        return _CACHE[key]


def check_channels(pred: Predictor, channels: int, src: str) -> None:
    want = pred.checkpoint.spec.in_channels
    if channels != want:
        raise InputError(
            f"{src}: has {channels} channel(s) but the model expects {want}; pick a scene with "
            f"{want} band(s) or a model trained on {channels}"
        )
