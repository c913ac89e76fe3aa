"""``segcore train``: train a model on image/mask pairs (one process, or DDP over Dask workers)."""

from __future__ import annotations

import argparse
import json

from pydantic import ValidationError

from segcore.errors import ConfigError


def _class_map(s: str):
    if s in ("binary", "instances", "instances-borders"):
        return s
    try:
        return {int(k): int(v) for k, v in (p.split(":") for p in s.split(","))}
    except ValueError as e:
        raise argparse.ArgumentTypeError(
            f"class map {s!r}: use 'binary', 'instances', 'instances-borders' or 'VALUE:CLASS,...' e.g. '0:1,255:0'"
        ) from e


def add_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", required=True, help="folder with images/ + masks/ (local or s3://)")
    p.add_argument("--stems", help="training stems, e.g. 0-24 or 0001-0250")
    p.add_argument("--val", help="validation folder (default: none)")
    p.add_argument("--val-stems")
    p.add_argument("--arch", help="unet (default) | u2net | u2netp | u2net-rec | u2netp-rec; "
                   "with --init, the init model's")
    p.add_argument("--model-kwargs", default="{}", help='JSON, e.g. \'{"depth": 4, "width": 16}\'')
    p.add_argument("--patch", type=int, default=256)
    p.add_argument("--resize", type=int, help="resize every image to N x N first (SOD recipe)")
    p.add_argument("--batch", type=int, default=4)
    stop = p.add_mutually_exclusive_group(required=True)
    stop.add_argument("--steps", type=int)
    stop.add_argument("--minutes", type=float)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--weight-decay", type=float, default=1e-4)
    p.add_argument("--ema", type=float, help="weight EMA decay, e.g. 0.995; checkpoints hold "
                   "the averaged weights")
    p.add_argument("--loss", choices=("bce+dice", "bce", "dice"), default="bce+dice",
                   help="bce suits pixel-error targets, bce+dice overlap targets")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--class-map", type=_class_map, default="binary",
                   help="binary | instances | instances-borders (touching ids split by background) | "
                   "VALUE:CLASS,... (ISBI: 0:1,255:0)")
    p.add_argument("--class-names", help="the classes, background first (default "
                   "background,foreground; with --init, the init model's); naming only the "
                   "foreground class (nucleus) is enough for a binary model")
    from segcore.cli.common import add_channel_args

    add_channel_args(p, train=True)
    p.add_argument("--normalization", choices=("auto", "scale", "stats"), default="auto",
                   help="stats: per-channel percentiles (clip) and mean/std measured on the "
                        "training data and stored in the checkpoint, for uint16/float images "
                        "(no hand-set scale); scale: x/255 (8-bit); auto (default): scale for "
                        "8-bit images, else stats")
    p.add_argument("--percentiles", default="0.5,99.5", metavar="LOW,HIGH",
                   help="stats: clipping percentiles (default 0.5,99.5)")
    p.add_argument("--fg-fraction", type=float, default=0.0)
    p.add_argument("--augment", default="{}", help='JSON AugmentConfig, e.g. \'{"rot90": false}\'')
    p.add_argument("--border-weight", action="store_true", help="U-Net border weight map")
    p.add_argument("--no-deep-supervision", action="store_true")
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=False,
                   help="bf16 autocast (fast on AMX CPUs and GPUs; slow on CPUs without it)")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                   help="channels_last memory format (default: on for CUDA and U-Net on CPU, "
                   "off for U2-Net on CPU, where it measured slower)")
    p.add_argument("--threads", type=int)
    p.add_argument("--device")
    p.add_argument("--checkpoint-every", type=int, default=500)
    p.add_argument("--val-every", type=int, default=250)
    p.add_argument("--resume", help="checkpoint URI to continue from")
    p.add_argument("--init", metavar="MODEL",
                   help="fine-tune: start from this model's weights, a shipped model's name "
                        "(`segcore models`, e.g. nuclei-he) or a checkpoint URI; keeps its "
                        "architecture, normalisation, class names and pixel size")
    p.add_argument("--pixel-size", type=float, metavar="S",
                   help="pixel size of the training images (um/px for slides, m/px for "
                        "scenes), recorded in the checkpoint: segment then picks the pyramid "
                        "level at that scale")
    p.add_argument("--pixel-unit", choices=("micrometer", "meter"),
                   help="unit of --pixel-size (default micrometer)")
    p.add_argument("--workers", type=int, default=0,
                   help="N > 0: DDP over N Dask workers (--scheduler, or a LocalCluster)")
    p.add_argument("--scheduler", help="Dask scheduler address for --workers")
    p.add_argument("--out", required=True, help="checkpoint URI, e.g. runs/isbi/unet.safetensors")
    p.add_argument("--quiet", action="store_true")


def _pair(text: str) -> tuple[float, float]:
    try:
        lo, hi = (float(v) for v in text.split(","))
    except ValueError:
        raise ConfigError(f"--percentiles {text!r}: give LOW,HIGH, e.g. 0.5,99.5") from None
    return lo, hi


def build_config(args: argparse.Namespace):
    from segcore.training.config import AugmentConfig, TrainConfig

    try:
        named = {k: v for k, v in (("arch", args.arch), ("init", args.init),
                                     ("class_names", args.class_names)) if v is not None}
        return TrainConfig(
            **named, data=args.data, data_stems=args.stems, val=args.val, val_stems=args.val_stems,
            model_kwargs=json.loads(args.model_kwargs), patch=args.patch,
            resize=args.resize, batch=args.batch, steps=args.steps, minutes=args.minutes,
            lr=args.lr, warmup=args.warmup, weight_decay=args.weight_decay, loss=args.loss,
            ema=args.ema,
            channels_last=args.channels_last, seed=args.seed, class_map=args.class_map,
            fg_fraction=args.fg_fraction,
            augment=AugmentConfig(**json.loads(args.augment)), border_weight=args.border_weight,
            deep_supervision=False if args.no_deep_supervision else None, bf16=args.bf16,
            threads=args.threads, device=args.device, checkpoint_every=args.checkpoint_every,
            val_every=args.val_every, resume=args.resume, out=args.out,
            pixel_size=args.pixel_size,
            pixel_unit=args.pixel_unit or ("micrometer" if args.pixel_size else None),
            channels=args.channels, channel_names=args.channel_names,
            normalization=args.normalization, percentiles=_pair(args.percentiles))
    except json.JSONDecodeError as e:
        raise ConfigError(f"--model-kwargs/--augment must be JSON objects: {e}") from e
    except ValidationError as e:
        raise ConfigError(f"invalid training options: {e}") from e


def run(args: argparse.Namespace) -> int:
    cfg = build_config(args)
    if args.workers:
        from distributed import Client, LocalCluster

        from segcore.training.distributed import glibc_default_malloc, train_distributed

        if args.scheduler:
            with Client(args.scheduler) as client:
                res = train_distributed(cfg, client, args.workers)
        else:
            with glibc_default_malloc():
                cluster = LocalCluster(n_workers=args.workers, threads_per_worker=1,
                                       processes=True, dashboard_address=None)
            with cluster, Client(cluster) as client:
                res = train_distributed(cfg, client, args.workers)
    else:
        from segcore.training.loop import train

        res = train(cfg, progress=not args.quiet)
    summary = {"checkpoint": res.checkpoint, "best": res.best, "steps": res.steps,
               "minutes": round(res.seconds / 60, 2),
               "final_loss_mean20": sum(res.losses[-20:]) / max(len(res.losses[-20:]), 1),
               "best_val_dice": res.best_val, "curve": res.curve}
    print(json.dumps(summary, indent=2))
    return 0
