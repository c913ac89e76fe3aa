"""Checkpoints that carry their own contract, and whose loading never executes code.

Format: one safetensors file. The header's string metadata holds ``segcore.spec`` (the
architecture as a ModelSpec), ``segcore.contract`` (channels, normalisation, class names,
pixel size trained at), ``segcore.sha256`` (a digest of every tensor, name and byte, so a
flipped weight is caught) and free-form ``segcore.extra``. safetensors parses only JSON and raw
tensor bytes, so a hostile file cannot run code; anything that is not ours is refused by name.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

import torch
from pydantic import ValidationError
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import nn

from segcore.config import InputContract, ModelSpec
from segcore.errors import CheckpointError, ConfigError
from segcore.io.uri import read_bytes, write_bytes_atomic

FORMAT = "segcore-checkpoint/1"


@dataclass(frozen=True)
class Checkpoint:
    spec: ModelSpec
    contract: InputContract
    sha256: str
    extra: dict[str, Any] = field(default_factory=dict)


def _digest(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(name.encode())
        h.update(str(t.dtype).encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def checkpoint_bytes(model: nn.Module, contract: InputContract, spec: ModelSpec | None = None,
                     extra: dict[str, Any] | None = None) -> bytes:
    spec = spec or getattr(model, "spec", None)
    if spec is None:
        raise ConfigError("model has no .spec: build it with segcore.models.build_model")
    if contract.channels != spec.in_channels:
        raise ConfigError(
            f"contract says {contract.channels} input channels but the model takes "
            f"{spec.in_channels}"
        )
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    meta = {
        "format": FORMAT,
        "segcore.spec": spec.model_dump_json(),
        "segcore.contract": contract.model_dump_json(),
        "segcore.sha256": _digest(tensors),
        "segcore.extra": json.dumps(extra or {}),
    }
    return st_save(tensors, metadata=meta)


def save_checkpoint(model: nn.Module, uri: str, contract: InputContract,
                    spec: ModelSpec | None = None, extra: dict[str, Any] | None = None) -> str:
    """Write the checkpoint to a local path or any fsspec URI, atomically. Returns its sha256."""
    data = checkpoint_bytes(model, contract, spec, extra)
    write_bytes_atomic(uri, data)
    return hashlib.sha256(data).hexdigest()


def read_model_bytes(uri: str) -> bytes:
    """The checkpoint's bytes: ``uri`` is a checkpoint URI or the name of a shipped model
    (segcore.models.pretrained; its file's sha256 is checked against the package index)."""
    from segcore.models.pretrained import resolve

    return read_bytes(resolve(uri))


def _header_metadata(data: bytes, uri: str) -> dict[str, str]:
    if len(data) < 8:
        raise CheckpointError(f"{uri}: not a segcore checkpoint (file is {len(data)} bytes)")
    n = int.from_bytes(data[:8], "little")
    if n <= 0 or n > min(len(data) - 8, 100 * 2**20):
        raise CheckpointError(
            f"{uri}: not a segcore checkpoint (no safetensors header); "
            "pass a file written by `segcore train` or segcore.models.save_checkpoint"
        )
    try:
        header = json.loads(data[8:8 + n])
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{uri}: not a segcore checkpoint (header is not JSON: {e})") from e
    meta = header.get("__metadata__") or {}
    if meta.get("format") != FORMAT:
        raise CheckpointError(
            f"{uri}: a safetensors file but not a segcore checkpoint (format "
            f"{meta.get('format')!r}, expected {FORMAT!r})"
        )
    return meta


def read_checkpoint(data: bytes, uri: str = "<bytes>") -> tuple[Checkpoint, dict[str, torch.Tensor]]:
    meta = _header_metadata(data, uri)
    try:
        spec = ModelSpec.model_validate_json(meta["segcore.spec"])
        contract = InputContract.model_validate_json(meta["segcore.contract"])
        extra = json.loads(meta.get("segcore.extra", "{}"))
    except (KeyError, ValidationError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{uri}: checkpoint metadata is damaged: {e}") from e
    try:
        tensors = st_load(data)
    except (SafetensorError, ValueError) as e:
        raise CheckpointError(f"{uri}: checkpoint tensors are damaged: {e}") from e
    digest = _digest(tensors)
    if digest != meta.get("segcore.sha256"):
        raise CheckpointError(
            f"{uri}: weights do not match the checkpoint's recorded digest (file altered or "
            "corrupted); re-export it from the training run"
        )
    return Checkpoint(spec, contract, digest, extra), tensors


def check_weights(model: nn.Module, tensors: dict[str, torch.Tensor], uri: str,
                  arch: str) -> None:
    """Refuse weights that do not fit ``model`` (names and shapes; ``model`` may live on the
    meta device): what ``load_state_dict`` would refuse, found before anything is written."""
    state = model.state_dict()
    missing, unexpected = set(state) - set(tensors), set(tensors) - set(state)
    wrong = sorted(k for k in set(state) & set(tensors)
                   if tuple(state[k].shape) != tuple(tensors[k].shape))
    if missing or unexpected or wrong:
        detail = f"missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]}" \
            if missing or unexpected else \
            f"{wrong[0]} is {tuple(tensors[wrong[0]].shape)}, the spec builds " \
            f"{tuple(state[wrong[0]].shape)}; {len(wrong)} tensor(s) differ"
        raise CheckpointError(
            f"{uri}: weights do not match the spec {arch!r} ({detail}); the file was not "
            "written by segcore for these weights: re-export it from the training run")


def load_checkpoint(uri: str, device: str | torch.device = "cpu") -> tuple[nn.Module, Checkpoint]:
    """Rebuild the model from the checkpoint's own spec and load its weights (eval mode)."""
    from segcore.models.registry import build_model

    data = read_model_bytes(uri)
    ckpt, tensors = read_checkpoint(data, uri)
    model = build_model(ckpt.spec)
    check_weights(model, tensors, uri, ckpt.spec.arch)  # names and shapes, one clear line
    try:
        model.load_state_dict(tensors, strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"{uri}: weights do not match the spec {ckpt.spec.arch!r} "
                              f"({str(e).splitlines()[0]}); re-export it from the training "
                              "run") from e
    return model.to(device).eval(), ckpt
