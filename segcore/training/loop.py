"""The training loop: AdamW, linear warm-up + cosine, bf16 autocast, channels_last, gradient
clipping, fixed seeds, periodic and best-by-validation checkpoints to any URI, exact resume, and
a stop by steps or by minutes. The same function runs one DDP rank (see distributed.py).

Files written next to ``cfg.out`` (a safetensors checkpoint):
  <out>                  latest weights + InputContract (segcore.models.checkpoint)
  <stem>.best.<ext>      best by validation Dice (when ``val`` is given)
  <out>.state.pt         optimizer, step, RNG, elapsed time, history (torch.load weights_only)
  <out>.history.json     losses and validation figures;  <out>.curve.png  the training curve
"""

from __future__ import annotations

import copy
import io
import json
import math
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from segcore.config import InputContract, ModelSpec, Normalization
from segcore.errors import CheckpointError, ConfigError, DataError
from segcore.io.uri import exists, read_bytes, write_bytes_atomic
from segcore.models.checkpoint import (
    check_weights,
    read_checkpoint,
    read_model_bytes,
    save_checkpoint,
)
from segcore.models.registry import build_model
from segcore.training.augment import augment_batch
from segcore.training.config import TrainConfig
from segcore.training.data import (
    PatchSampler,
    channel_stats,
    input_stats,
    load_folder,
    resize_sample,
    unit_mapper,
)
from segcore.training.losses import border_weight_map, deep_supervision_loss, seg_loss
from segcore.training.metrics import dice
from segcore.training.predict import amp_dtype, autocast, normalise, predict_image


@dataclass(frozen=True)
class TrainResult:
    checkpoint: str
    best: str | None
    steps: int
    seconds: float
    losses: list[float] = field(default_factory=list)
    val: list[tuple[int, float]] = field(default_factory=list)  # (step, mean Dice)
    best_val: float | None = None
    curve: str | None = None


def state_uri(out: str) -> str:
    return out + ".state.pt"


def best_uri(out: str) -> str:
    head, dot, ext = out.rpartition(".")
    return f"{head}.best.{ext}" if dot and "/" not in ext else out + ".best"


class _AllOutputs(nn.Module):
    """Wraps a model so forward() returns a list of logits ([fused, sides...] for U2-Net with
    deep supervision): DDP only synchronises through forward()."""

    def __init__(self, model: nn.Module, deep: bool):
        super().__init__()
        self.model, self.deep = model, deep

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return self.model.forward_all(x) if self.deep else [self.model(x)]


def lr_at(cfg: TrainConfig, step: int, elapsed: float) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    if cfg.steps is not None:
        frac = (step - cfg.warmup) / max(cfg.steps - cfg.warmup, 1)
    else:
        frac = elapsed / (cfg.minutes * 60)  # type: ignore[operator]
    return cfg.lr * 0.5 * (1 + math.cos(math.pi * min(max(frac, 0.0), 1.0)))


def resolve_device(cfg: TrainConfig) -> torch.device:
    if cfg.device:
        return torch.device(cfg.device)
    return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")


def prepare_data(cfg: TrainConfig):
    train = load_folder(cfg.data, cfg.data_stems, cfg.class_map, cfg.channels, cfg.channel_names)
    val = load_folder(cfg.val, cfg.val_stems, cfg.class_map, cfg.channels,
                      cfg.channel_names) if cfg.val else []
    if cfg.resize:
        train = [resize_sample(s, cfg.resize) for s in train]
    channels = train[0].image.shape[2]
    if cfg.in_channels is not None and cfg.in_channels != channels:
        raise DataError(f"{cfg.data}: images have {channels} channels but in_channels is "
                        f"{cfg.in_channels}; drop in_channels or convert the images")
    for s in val:
        if s.image.shape[2] != channels:
            raise DataError(f"{s.image_uri}: {s.image.shape[2]} channels, training images have "
                            f"{channels}")
    mode = cfg.normalization
    if mode == "auto":
        mode = "scale" if all(s.image.dtype == np.uint8 for s in train) else "stats"
    if mode == "scale":
        bad = next((s for s in train if s.image.dtype != np.uint8), None)
        if bad is not None:
            raise DataError(f"{bad.image_uri}: {bad.image.dtype} image; normalization 'scale' "
                            "(x/255) is for 8-bit images: use 'stats' (or 'auto')")
        mean, std = channel_stats(train)
        norm = Normalization(scale=255.0, mean=mean, std=std)
    else:
        st = input_stats(train, cfg.percentiles)
        norm = Normalization(mode="stats", scale=1.0, percentiles=cfg.percentiles, **st)
    names = {s.channel_names for s in train}
    if len(names) > 1:
        raise DataError(f"{cfg.data}: the images name their channels differently "
                        f"({sorted(str(n) for n in names)[:3]}); select the same channels "
                        "by name with channels/--channels")
    contract = InputContract(channels=channels, normalization=norm, class_names=cfg.class_names,
                             pixel_size=cfg.pixel_size, pixel_unit=cfg.pixel_unit,
                             channel_names=names.pop())
    return train, val, contract


def _init_config(cfg: TrainConfig):
    """With ``cfg.init``: (cfg with the init model's architecture, (checkpoint, tensors)).
    An architecture, kwargs or output count given explicitly and unlike the model's is refused."""
    if not cfg.init:
        return cfg, None
    ckpt, tensors = read_checkpoint(read_model_bytes(cfg.init), cfg.init)
    given = cfg.model_fields_set
    s = ckpt.spec
    for name, mine, theirs in (("arch", cfg.arch, s.arch),
                                ("model_kwargs", cfg.model_kwargs, dict(s.kwargs)),
                                ("out_channels", cfg.out_channels, s.out_channels)):
        if name in given and mine != theirs and not (name == "model_kwargs" and not mine):
            raise ConfigError(
                f"init {cfg.init}: the model is {s.arch} {dict(s.kwargs)} with "
                f"{s.out_channels} output(s); {name} {mine!r} differs: drop it (fine-tuning "
                "keeps the model's architecture) or train from scratch without init")
    return cfg.model_copy(update={"arch": s.arch, "model_kwargs": dict(s.kwargs),
                                  "out_channels": s.out_channels}), (ckpt, tensors)


def _init_contract(cfg: TrainConfig, ckpt, data_contract: InputContract) -> InputContract:
    """Fine-tuning keeps the model's input contract (normalisation, channel names, pixel size,
    class names) unless the run names its own pixel size or class names."""
    c = ckpt.contract
    if data_contract.channels != c.channels:
        raise DataError(f"{cfg.data}: images have {data_contract.channels} channel(s), the init "
                        f"model {cfg.init} takes {c.channels}; select channels with --channels")
    given = cfg.model_fields_set
    return c.model_copy(update={
        "class_names": cfg.class_names if "class_names" in given else c.class_names,
        "pixel_size": cfg.pixel_size if cfg.pixel_size else c.pixel_size,
        "pixel_unit": cfg.pixel_unit if cfg.pixel_size else c.pixel_unit,
        "channel_names": c.channel_names or data_contract.channel_names})


def validate(model: nn.Module, val, contract: InputContract, cfg: TrainConfig,
             device: torch.device) -> float:
    was = model.training
    model.eval()
    scores = [dice(s.mask, predict_image(model, s.image, contract.normalization, device,
                                         cfg.resize, cfg.bf16,
                                         cfg.use_channels_last(device.type),
                                         nodata=s.nodata) >= 0.5)
              for s in val]
    model.train(was)
    return float(np.mean(scores))


@torch.no_grad()
def _ema_update(ema: nn.Module, model: nn.Module, decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * model, for parameters and float buffers (BN running
    statistics); integer buffers (BN's batch counter) are copied."""
    src = model.state_dict()
    for k, v in ema.state_dict().items():
        if v.dtype.is_floating_point:
            v.lerp_(src[k], 1.0 - decay)
        else:
            v.copy_(src[k])


def _save_state(uri: str, state: dict[str, Any]) -> None:
    buf = io.BytesIO()
    torch.save(state, buf)
    write_bytes_atomic(uri, buf.getvalue())


def _load_state(uri: str) -> dict[str, Any]:
    try:
        return torch.load(io.BytesIO(read_bytes(uri)), weights_only=True, map_location="cpu")
    except (RuntimeError, EOFError, ValueError) as e:  # pickle/zip errors surface as these
        raise CheckpointError(f"{uri}: not a segcore training state ({e}); resume from the "
                              "checkpoint written by `segcore train`") from e


def run(cfg: TrainConfig, progress: bool = True, rank: int = 0, world: int = 1,
        device: torch.device | None = None) -> TrainResult:
    """Train (one process, or one DDP rank when ``world > 1`` and the process group is up)."""
    if cfg.batch % world:
        raise ConfigError(f"batch {cfg.batch} must be divisible by the number of workers {world}")
    device = device or resolve_device(cfg)
    if cfg.threads and device.type == "cpu":
        torch.set_num_threads(cfg.threads)
    cfg, init = _init_config(cfg)
    train, val, contract = prepare_data(cfg)
    if init is not None:
        contract = _init_contract(cfg, init[0], contract)
    spec = ModelSpec(arch=cfg.arch, in_channels=contract.channels, out_channels=cfg.out_channels,
                     kwargs=cfg.model_kwargs)
    torch.manual_seed(cfg.seed)
    model = build_model(spec)
    if cfg.use_deep_supervision and not hasattr(model, "forward_all"):
        raise ConfigError(f"deep_supervision needs a U2-Net family model, not {cfg.arch!r}")
    if init is not None:
        check_weights(model, init[1], cfg.init, spec.arch)
        model.load_state_dict(init[1])
    gen = torch.Generator().manual_seed(cfg.seed)
    opt_state, step, elapsed, losses, vals, best = None, 0, 0.0, [], [], None
    raw_state = None
    if cfg.resume:
        ckpt, tensors = read_checkpoint(read_model_bytes(cfg.resume), cfg.resume)
        if ckpt.spec != spec:
            raise CheckpointError(f"{cfg.resume}: was trained as {ckpt.spec}, this run builds "
                                  f"{spec}; resume with the same arch and model kwargs")
        st = _load_state(state_uri(cfg.resume))
        # the state's own copy of the weights: a crash between writing the checkpoint and
        # its state leaves a checkpoint one interval ahead of the optimizer and sampler
        model.load_state_dict(st.get("weights", tensors))
        opt_state, step, elapsed = st["optimizer"], int(st["step"]), float(st["elapsed"])
        if bool(cfg.ema) != ("raw_model" in st):  # its weights are an average, or are not
            was = "with" if "raw_model" in st else "without"
            raise CheckpointError(f"{cfg.resume}: was trained {was} ema; resume {was} --ema "
                                  "or start a new run")
        raw_state = st.get("raw_model")
        gen.set_state(st["rng"])
        losses, best = list(st["losses"].tolist()), st.get("best")
        vals = [(int(a), float(b)) for a, b in st["val"].tolist()]
        best = float(best) if best is not None else None
    model.to(device)
    channels_last = cfg.use_channels_last(device.type)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    model.train()
    ema_model = None
    if cfg.ema:  # the averaged copy is what checkpoints hold; the raw weights go to .state.pt
        ema_model = copy.deepcopy(model).eval()
        if raw_state is not None:
            model.load_state_dict(raw_state)
    final = model if ema_model is None else ema_model  # what checkpoints and validation use
    net: nn.Module = _AllOutputs(model, cfg.use_deep_supervision)
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel

        net = DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda"
                                      else None)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    if opt_state is not None:
        opt.load_state_dict(opt_state)
    scaler = torch.amp.GradScaler("cuda") if amp_dtype(device, cfg.bf16) == torch.float16 \
        else None
    norm = contract.normalization
    sampler = PatchSampler(train, cfg.patch, cfg.fg_fraction,
                           unit_mapper(norm) if norm.mode == "stats" else None)
    per_rank = cfg.batch // world
    extra = {"resize": cfg.resize, "class_map": cfg.class_map, "arch": cfg.arch,
             "patch": cfg.patch, "data": cfg.data, "data_stems": cfg.data_stems,
             **({"init": cfg.init, "init_sha256": init[0].sha256} if init else {})}

    def checkpoint(uri: str, with_state: bool) -> None:
        save_checkpoint(final, uri, contract, spec,
                        {**extra, "step": step, "ema": cfg.ema})
        if with_state:
            raw = {"raw_model": model.state_dict()} if ema_model is not None else {}
            _save_state(state_uri(uri), {**raw, "weights": final.state_dict(),
                "optimizer": opt.state_dict(), "step": step, "elapsed": elapsed,
                "rng": gen.get_state(), "losses": torch.tensor(losses, dtype=torch.float64),
                "val": torch.tensor(vals, dtype=torch.float64).reshape(-1, 2), "best": best})

    bar = None
    if progress and rank == 0:
        from segcore.execute import progress_bar

        bar = progress_bar(cfg.steps, "train", "step", initial=step,
                           bar_format=None if cfg.steps else "{n} steps {elapsed} {postfix}")
    t0 = time.monotonic() - elapsed
    budget = cfg.minutes * 60 if cfg.minutes else None
    while True:
        elapsed = time.monotonic() - t0
        stop = ((cfg.steps is not None and step >= cfg.steps)
                or (budget is not None and elapsed >= budget)
                or (cfg.stop_after is not None and step >= cfg.stop_after))
        if world > 1:  # every rank stops at the same step (rank 0's clock decides)
            flag = torch.tensor([float(stop)], device=device)
            torch.distributed.broadcast(flag, 0)
            stop = bool(flag.item())
        if stop:
            break
        lr = lr_at(cfg, step, elapsed)
        for g in opt.param_groups:
            g["lr"] = lr
        x, y = sampler.sample(cfg.batch, gen)
        x, y = augment_batch(x, y, cfg.augment, gen)
        x, y = x[rank * per_rank:(rank + 1) * per_rank], y[rank * per_rank:(rank + 1) * per_rank]
        weight = None
        if cfg.border_weight:
            weight = torch.from_numpy(np.stack([border_weight_map(m[0].numpy()) for m in y]))
            weight = weight[:, None].to(device)
        x = normalise(x.to(device), contract.normalization)
        y = y.to(device)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast(device, cfg.bf16):
            outs = net(x)
        loss = deep_supervision_loss(outs, y, cfg.loss, weight) if cfg.use_deep_supervision \
            else seg_loss(outs[0], y, cfg.loss, weight)
        opt.zero_grad(set_to_none=True)
        if scaler is not None:  # fp16 on GPUs without bf16
            scaler.scale(loss).backward()
            scaler.unscale_(opt)
        else:
            loss.backward()
        if cfg.grad_clip:
            nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        if scaler is not None:
            scaler.step(opt)
            scaler.update()
        else:
            opt.step()
        step += 1
        if ema_model is not None:
            _ema_update(ema_model, model, min(cfg.ema, (1 + step) / (10 + step)))
        lv = loss.detach().float()
        if world > 1:
            torch.distributed.all_reduce(lv)
            lv = lv / world
        losses.append(float(lv))
        if not math.isfinite(losses[-1]):
            raise ConfigError(f"loss became {losses[-1]} at step {step}; lower lr (now {cfg.lr})")
        elapsed = time.monotonic() - t0
        if rank == 0:
            if val and step % cfg.val_every == 0:
                v = validate(final, val, contract, cfg, device)
                vals.append((step, v))
                if best is None or v > best:
                    best = v
                    checkpoint(best_uri(cfg.out), with_state=False)
            if step % cfg.checkpoint_every == 0:
                checkpoint(cfg.out, with_state=True)
            if bar is not None:
                post = {"loss": f"{np.mean(losses[-20:]):.4f}", "lr": f"{lr:.2e}"}
                if vals:
                    post["val_dice"] = f"{vals[-1][1]:.4f}"
                if budget:
                    post["eta"] = f"{max(budget - elapsed, 0) / 60:.1f}min"
                bar.set_postfix(post, refresh=False)
                bar.update(1)
    if bar is not None:
        bar.close()
    curve = None
    if rank == 0:
        if val and (not vals or vals[-1][0] != step):
            v = validate(final, val, contract, cfg, device)
            vals.append((step, v))
            if best is None or v > best:
                best = v
                checkpoint(best_uri(cfg.out), with_state=False)
        checkpoint(cfg.out, with_state=True)
        hist = {"losses": losses, "val": vals, "best_val": best, "seconds": elapsed,
                "steps": step, "config": cfg.model_dump(mode="json")}
        write_bytes_atomic(cfg.out + ".history.json", json.dumps(hist).encode())
        from segcore.training.curve import curve_png

        curve = cfg.out + ".curve.png"
        write_bytes_atomic(curve, curve_png(losses, vals))
    has_best = bool(val) and rank == 0 and exists(best_uri(cfg.out))
    return TrainResult(cfg.out, best_uri(cfg.out) if has_best else None, step, elapsed, losses,
                       vals, best, curve)


def train(cfg: TrainConfig, progress: bool = True) -> TrainResult:
    """Train in this process (CPU or one GPU). See TrainConfig for every option."""
    return run(cfg, progress=progress)
