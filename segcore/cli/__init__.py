"""The ``segcore`` command line. Each verb lives in its own module with ``add_parser`` and
``run``; they are imported lazily so ``segcore models`` does not pay for Dask or zarr.

Exit codes: 0 ok, 2 bad input/config (the message names the input and what to change),
3 storage failure, 1 anything unexpected.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from segcore.errors import SegcoreError

# verb -> (module, one-line help)
VERBS: dict[str, tuple[str, str]] = {
    "models": ("segcore.cli.models", "list the model registry with parameter counts"),
    "ingest": ("segcore.cli.ingest", "convert a scene into a tiled, sharded OME-Zarr image"),
    "segment": ("segcore.cli.segment", "segment a scene of any size, tile by tile, exactly"),
    "train": ("segcore.cli.train", "train a model on image/mask pairs"),
    "evaluate": ("segcore.cli.evaluate", "score a checkpoint on labelled data"),
    "watch": ("segcore.cli.watch", "announce new scenes under a prefix as Prefect events"),
    "export": ("segcore.cli.export", "the mask as a GeoTIFF, or the objects as QuPath GeoJSON, "
               "GeoPackage, GeoParquet or WGS84 GeoJSON"),
    "objects": ("segcore.cli.objects", "objects with global ids across shards, and their table"),
}


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, object]]:
    parser = argparse.ArgumentParser(
        prog="segcore", description="Seam-free segmentation of scenes too large for memory.")
    from segcore import __version__

    parser.add_argument("--version", action="version", version=f"segcore {__version__}")
    sub = parser.add_subparsers(dest="verb", metavar="COMMAND")
    modules: dict[str, object] = {}
    for verb, (modname, help_) in VERBS.items():
        try:
            mod = importlib.import_module(modname)
        except ModuleNotFoundError as e:
            if e.name == modname:  # verb not built yet
                continue
            raise
        p = sub.add_parser(verb, help=help_, description=help_)
        mod.add_parser(p)  # type: ignore[attr-defined]
        modules[verb] = mod
    return parser, modules


def main(argv: list[str] | None = None) -> int:
    parser, modules = build_parser()
    args = parser.parse_args(argv)
    if not args.verb:
        parser.print_help()
        return 2
    try:
        return int(modules[args.verb].run(args) or 0)  # type: ignore[attr-defined]
    except SegcoreError as e:
        print(f"segcore {args.verb}: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print(f"segcore {args.verb}: interrupted; nothing was published", file=sys.stderr)
        return 130


def entry() -> None:
    """The console script: :func:`main`, then a fast exit. Tearing down an interpreter that
    has loaded torch takes ~0.8 s on one core (its C++ destructors and module teardown), a
    seventh of a small scene's wall clock. Once the command is done (results published, the
    Dask cluster closed), the atexit handlers run, the output is flushed and the process exits
    without that teardown, unless a non-daemon thread is still alive, or SEGCORE_SLOW_EXIT=1."""
    rc = main()
    _exit(rc)


def _exit(rc: int) -> None:
    import atexit
    import os
    import threading

    me = threading.current_thread()
    busy = any(t is not me and t.is_alive() and not t.daemon for t in threading.enumerate())
    if busy or os.environ.get("SEGCORE_SLOW_EXIT") == "1":
        sys.exit(rc)
    atexit._run_exitfuncs()  # logging.shutdown, concurrent.futures joins, library hooks
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(rc)


if __name__ == "__main__":
    entry()
