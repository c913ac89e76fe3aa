"""How large a window the device can hold: ``--tile auto``.

Inference memory is linear in the window's pixels: the live activations of one forward pass.
They are measured, not guessed: the model runs once on the meta device (shapes only, nothing
computed or allocated) under a dispatch mode that adds each new tensor's bytes when it is made
and takes them away when it is freed; the peak over the pass, per input pixel, is the model's
cost. The budget is the device's free memory (CUDA) or a share of the machine's available RAM
(CPU), with a safety factor for allocator slack and the pipeline's own buffers.
"""

from __future__ import annotations

import os
import weakref

from segcore.config import ModelSpec
from segcore.errors import ConfigError
from segcore.tiling import round_up

PROBE_SIDE = 256
SAFETY = 1.5  # measured peak x this: allocator fragmentation, workspace, prefetched windows
CPU_SHARE = 0.25  # of MemAvailable, per process running the model
MAX_TILE = {"cpu": 4096, "cuda": 8192}
MIN_TILE = 256


def activation_bytes_per_pixel(spec: ModelSpec, amp: str = "none") -> float:
    """Peak bytes of live tensors per input pixel during one inference forward pass."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    from segcore.models.registry import build_model

    state = {"live": 0, "peak": 0}

    def release(n: int) -> None:
        state["live"] -= n

    class Track(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, tuple | list) else (out,):
                if isinstance(t, torch.Tensor):
                    n = t.numel() * t.element_size()
                    state["live"] += n
                    weakref.finalize(t, release, n)
            state["peak"] = max(state["peak"], state["live"])
            return out

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp, torch.float32)
    with torch.device("meta"):
        model = build_model(spec).eval().to(dtype)
        m = int(getattr(model, "input_multiple", 1))
        side = round_up(PROBE_SIDE, m)
        x = torch.empty(1, spec.in_channels, side, side, dtype=dtype)
    with torch.inference_mode(), Track():
        y = model(x)
        del y
    return state["peak"] / (side * side)


def memory_budget(device_type: str) -> tuple[int, str]:
    """(bytes, how it was found) that one process may spend on a batch of windows.
    ``SEGCORE_MEMORY_BUDGET`` (bytes, or with a G/M suffix) overrides."""
    env = os.environ.get("SEGCORE_MEMORY_BUDGET")
    if env:
        mult = {"G": 2**30, "M": 2**20}.get(env[-1].upper(), 1)
        try:
            return int(float(env.rstrip("GgMm")) * mult), "SEGCORE_MEMORY_BUDGET"
        except ValueError:
            raise ConfigError(f"SEGCORE_MEMORY_BUDGET={env!r} must be bytes, or a number "
                              "with a G or M suffix") from None
    if device_type == "cuda":
        import torch

        free, _ = torch.cuda.mem_get_info()
        return int(free * 0.8), f"80% of the GPU's free memory ({free / 2**30:.1f} GiB)"
    avail = _mem_available()
    return int(avail * CPU_SHARE), f"{CPU_SHARE:.0%} of available RAM ({avail / 2**30:.1f} GiB)"


def _mem_available() -> int:
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 4 * 2**30


def auto_tile(spec: ModelSpec, device_type: str, amp: str, batch: int, multiple: int,
              halo: int, height: int, width: int) -> tuple[int, int, str]:
    """The largest window (a multiple of ``multiple``) that fits the memory budget, capped
    per device type and at what one window over the whole scene needs, and the batch (at
    most ``batch``) of such windows that fits. A larger window wastes less on halos; a batch
    only helps a GPU with small windows. Returns (tile, batch, explanation)."""
    bpp = activation_bytes_per_pixel(spec, amp) * SAFETY
    budget, source = memory_budget(device_type)
    cap = MAX_TILE.get(device_type, MAX_TILE["cpu"])
    need = round_up(max(height, width), multiple) + 2 * round_up(halo, multiple)
    side = int((budget / bpp) ** 0.5) // multiple * multiple
    tile = max(min(side, cap, round_up(need, multiple)), round_up(MIN_TILE, multiple))
    fit = max(1, min(batch, int(budget // (tile * tile * bpp))))
    why = (f"--tile auto: {tile} px, batch {fit} ({bpp / 1024:.2f} KiB/px of activations incl. "
           f"x{SAFETY} slack; budget {budget / 2**30:.1f} GiB = {source}; cap {cap}, one "
           f"window over the scene needs {need})")
    return tile, fit, why


_LIBC: list = []
_TUNED: list[bool] = []
HEAP_KEEP = 1 << 30  # bytes: blocks up to this come from (and stay in) the heap, see tune_heap
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc mallopt parameters


def _libc():
    if not _LIBC:
        import ctypes
        import ctypes.util

        try:
            _LIBC.append(ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6"))
        except OSError:
            _LIBC.append(None)
    return _LIBC[0]


def tune_heap() -> bool:
    """Keep large freed blocks in the heap for the next window instead of unmapping them.

    glibc serves blocks above its mmap threshold (dynamic, at most 32 MB) with a fresh mmap
    and unmaps them on free, so every window's float input (50 MB at 2048^2 RGB), logits and
    labels are page-faulted in afresh, in every thread: one core, a fresh 2048^2x3 float32
    tensor filled in place took 40 ms (98 in two threads at once) against 5 (8) once the
    threshold is raised, numpy's uint8 -> float32 11 against 6.5 (``python
    bench/heap_probe.py``). Raises
    the mmap and trim thresholds to HEAP_KEEP once per process; :func:`trim_heap` still hands
    the free pages back as each task ends, so the peak is what it was. False where there is
    no glibc (nothing done)."""
    if _TUNED:
        return _TUNED[0]
    lib = _libc()
    ok = lib is not None and hasattr(lib, "mallopt")
    if ok:
        import ctypes

        ok = bool(lib.mallopt(M_MMAP_THRESHOLD, ctypes.c_int(HEAP_KEEP))) and \
            bool(lib.mallopt(M_TRIM_THRESHOLD, ctypes.c_int(HEAP_KEEP)))
    _TUNED.append(ok)
    return ok


def trim_heap() -> bool:
    """Hand the heap's free pages back to the OS (glibc ``malloc_trim``), as a shard task ends.
    Windows, batches and cores are megabytes each, allocated by several threads, so glibc's
    per-thread arenas keep freed blocks and a long scene's RSS creeps up by a few hundred MB
    before it levels off. Returns False where there is no glibc (musl, macOS): nothing done."""
    lib = _libc()
    if lib is None or not hasattr(lib, "malloc_trim"):
        return False
    lib.malloc_trim(0)
    return True
