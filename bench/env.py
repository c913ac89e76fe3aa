"""What a result was measured on: command line, date, commit, CPU, flags, torch, threads, GPU."""

from __future__ import annotations

import datetime as _dt
import os
import platform
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FLAGS_OF_INTEREST = ("amx_bf16", "amx_tile", "avx512_bf16", "avx512f", "avx2")


def cpu_info() -> tuple[str, list[str]]:
    """(CPU model name, the flags of interest it has) from /proc/cpuinfo."""
    model, flags = None, None
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        text = ""
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and model is None:
            model = value.strip()
        elif key == "flags" and flags is None:
            flags = set(value.split())
    flags = flags or set()
    return model or platform.processor() or "unknown", [f for f in FLAGS_OF_INTEREST if f in flags]


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True,
                             text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=ROOT, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def affinity() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def resolve_device(device: str) -> str:
    """'auto' -> 'cuda' when a GPU is visible, else 'cpu'; 'cuda' without a GPU is refused."""
    import torch

    has_cuda = torch.cuda.is_available()
    if device == "auto":
        device = "cuda" if has_cuda else "cpu"
    if device.startswith("cuda") and not has_cuda:
        raise SystemExit("--device cuda asked for, but no CUDA GPU is visible on this machine")
    if device != "cpu" and not device.startswith("cuda"):
        raise SystemExit(f"--device {device!r} must be auto, cpu or cuda")
    return device


def resolve_amp(amp: str, device: str) -> str:
    """The precision bare and MONAI run for ``--amp``: 'auto' = what segment's own choice
    picks (segcore.inference.choose_precision: bf16 on CUDA and on CPUs with AMX or
    AVX-512-BF16, honouring SEGCORE_CPU_FEATURES; fp32 elsewhere, where bf16 autocast is
    emulated and slower). segment is passed ``--amp`` unchanged and its report says what it
    chose, so all three contenders run at one precision."""
    if amp != "auto":
        return amp
    import torch

    from segcore.inference import choose_precision

    return choose_precision(torch.device("cuda" if device.startswith("cuda") else "cpu"),
                            "auto").amp


def environment(threads: int | None = None, device: str = "cpu") -> dict:
    import torch

    model, flags = cpu_info()
    cap = None
    try:
        cap = torch.backends.cpu.get_cpu_capability()
    except AttributeError:
        pass
    env = {
        "argv": [sys.executable, "-m", "bench", *sys.argv[1:]],
        "command": " ".join(["python -m bench", *sys.argv[1:]]),
        "date": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "git_commit": git_commit(),
        "hostname": platform.node(),
        "python": platform.python_version(),
        "cpu_model": model,
        "cpu_flags": flags,
        "cpu_features_override": os.environ.get("SEGCORE_CPU_FEATURES") or None,
        "cpu_count": os.cpu_count(),
        "affinity": affinity(),
        "torch": torch.__version__,
        "torch_cpu_capability": cap,
        "torch_threads": threads,
        "device": device,
        "cuda_device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    if env["cuda_device"]:
        # fp32 convolutions on Ampere and later run in TF32 by default (cuDNN)
        env["cudnn_allow_tf32"] = torch.backends.cudnn.allow_tf32
        env["cuda_version"] = torch.version.cuda
    return env


def gpu_line(env: dict) -> str:
    if env["cuda_device"]:
        return f"GPU: {env['cuda_device']} (device {env['device']})"
    return "no GPU present on this machine: every contender runs on the CPU"


def describe(env: dict) -> str:
    return (f"{env['cpu_model']} ({', '.join(env['cpu_flags']) or 'none of ' + '/'.join(FLAGS_OF_INTEREST)}),"
            f" torch {env['torch']} [{env['torch_cpu_capability']}], {env['torch_threads']} "
            f"thread(s), affinity {env['affinity']} of {env['cpu_count']} CPUs; {gpu_line(env)}")
