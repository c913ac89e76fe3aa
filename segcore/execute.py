"""Run a list of small task specs locally or as Dask futures, with a progress bar.

Tasks carry URIs and regions (never pixel arrays). Completed tasks are kept even when one
fails, because their shards are resumable; the first error is raised once all have ended
(a storage failure as a StorageError).
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Iterable

MAX_LANES = 4  # in-process tasks side by side (each holds a few windows or shards in flight)


def local_lanes(lanes: int | str, tasks: int) -> int:
    """Tasks one process runs side by side without Dask: 'auto' = the cores in this
    process's affinity, at most MAX_LANES; never more than there are tasks."""
    if lanes == "auto":
        lanes = min(MAX_LANES, available_cores())
    return max(1, min(int(lanes), tasks))


def available_cores() -> int:
    """The cores this process may run on (its affinity where the OS has one)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, cores or 1)


@contextlib.contextmanager
def process_lanes(lanes: int):
    """``lanes`` worker processes (spawned: this process runs zarr's event-loop thread, which
    a fork would copy mid-flight) to pass to :func:`run_tasks` as the client, for task work
    that holds the GIL (GDAL's polygonize through rasterio does); closed on exit."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    pool = ProcessPoolExecutor(max_workers=lanes, mp_context=multiprocessing.get_context("spawn"))
    try:
        yield pool
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


class _NoBar:
    def update(self, n: int) -> None:
        pass

    def set_postfix_str(self, s: str) -> None:
        pass

    def close(self) -> None:
        pass


class LineBar:
    """Progress for a log (stderr not a terminal): a line at the start, every ``every``
    seconds and at the end, instead of a bar redrawn with carriage returns that a log shows as
    one long line."""

    def __init__(self, total: int | None, desc: str, unit: str, every: float = 30.0,
                 n: int = 0) -> None:
        self.total, self.desc, self.unit, self.every, self.n = total, desc, unit, every, n
        self.post, self.t0, self.last = "", time.monotonic(), time.monotonic()
        self._line()  # where it starts (a resumed run: the step it resumes from)

    def _line(self) -> None:
        import sys

        of = f"/{self.total}" if self.total else ""
        post = f", {self.post}" if self.post else ""
        print(f"{self.desc}: {self.n}{of} {self.unit}s, {time.monotonic() - self.t0:.0f} s"
              f"{post}", file=sys.stderr, flush=True)
        self.last = time.monotonic()

    def update(self, n: int = 1) -> None:
        self.n += n
        if time.monotonic() - self.last >= self.every:
            self._line()

    def set_postfix_str(self, s: str) -> None:
        self.post = s

    def set_postfix(self, post: dict, refresh: bool = False) -> None:
        self.post = ", ".join(f"{k}={v}" for k, v in post.items())

    def close(self) -> None:
        self._line()


def progress_bar(total: int | None, desc: str, unit: str, initial: int = 0, **tqdm_kwargs):
    """A tqdm bar on a terminal, a :class:`LineBar` when stderr goes to a log or a pipe."""
    import sys

    if not sys.stderr.isatty():
        return LineBar(total, desc, unit, n=initial)
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit, initial=initial, dynamic_ncols=True,
                **tqdm_kwargs)


def _progress(total: int, enabled: bool, desc: str):
    if not enabled:
        return _NoBar()
    return progress_bar(total, desc, "tile")


def _outcomes(fn, specs: list, client, resources, lanes: int = 1
              ) -> Iterable[tuple[object, object, BaseException | None]]:
    """(spec, result, error) as each task ends: locally in order (``lanes`` 1) or as completed
    on ``lanes`` threads of this process, on a ``concurrent.futures`` pool given as the client
    (e.g. :func:`process_lanes`), and as completed on Dask."""
    if client is None and lanes <= 1:
        for s in specs:
            try:
                yield s, fn(s), None
            except Exception as e:  # noqa: BLE001 - handed to the caller, re-raised there
                yield s, None, e
        return
    from concurrent.futures import Executor, ThreadPoolExecutor, as_completed

    if client is None or isinstance(client, Executor):
        with contextlib.ExitStack() as stack:
            pool = client or stack.enter_context(
                ThreadPoolExecutor(max_workers=lanes, thread_name_prefix="segcore-lane"))
            local = {pool.submit(fn, s): s for s in specs}
            for fut in as_completed(local):
                err = fut.exception()
                yield local[fut], None if err else fut.result(), err
        return
    from distributed import as_completed

    futs = {client.submit(fn, s, resources=resources, pure=False): s for s in specs}
    for fut in as_completed(futs):
        try:
            yield futs[fut], fut.result(), None
        except Exception as e:  # noqa: BLE001 - handed to the caller, re-raised there
            yield futs[fut], None, e


def run_tasks(fn: Callable, specs: list, client, resources: dict | None, progress: bool,
              desc: str, count: Callable[[object], int], lanes: int = 1) -> list:
    """Run ``fn(spec)`` for every spec (each returns a list of dicts); without a client on
    ``lanes`` threads of this process. The bar shows tiles done/total, Mpx/s (from the
    results' ``pixels``) and the ETA."""
    results: list = []
    first_error: BaseException | None = None
    bar = _progress(sum(count(s) for s in specs), progress, desc)
    t0, px = time.perf_counter(), 0
    try:
        for spec, res, err in _outcomes(fn, specs, client, resources, lanes):
            if err is not None:
                first_error = first_error or err
                continue
            results.extend(res or [])
            px += sum(r.get("pixels", 0) for r in res or [] if isinstance(r, dict))
            bar.update(count(spec))
            elapsed = time.perf_counter() - t0
            if px and elapsed > 0:
                bar.set_postfix_str(f"{px / elapsed / 1e6:.2f} Mpx/s")
    finally:
        bar.close()
    if first_error is not None:
        raise _storage_error(first_error, desc)
    return results


def _storage_error(e: BaseException, desc: str) -> BaseException:
    """A task's storage failure (an OSError, or the S3 client's own transport errors after
    their bounded retries) as a StorageError naming the step; anything else unchanged."""
    from segcore.errors import SegcoreError, StorageError
    from segcore.io.uri import storage_error_types

    if isinstance(e, SegcoreError) or not isinstance(e, storage_error_types()):
        return e
    err = StorageError(f"{desc}: storage failed ({type(e).__name__}: {e}); completed shards "
                       "are kept and a rerun resumes")
    err.__cause__ = e
    return err
