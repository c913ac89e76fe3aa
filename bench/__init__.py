"""Benchmark harness: segcore's pipeline side by side with its compute limit and a peer.

Comparisons (``python -m bench <comparison> --help`` for every option):

``compare``
    One model, weights, scene, thread count and precision; contenders, each in its own fresh
    process, interleaved per repetition:

    - ``bare``: the bare model on the whole image in one forward pass, mirror-padded as
      ``segcore.stitching.predict_whole`` does (the compute limit; only the forward is timed).
      Scenes above ``--bare-max-side`` are measured on a central crop ("extrapolated").
    - ``segment``: ``segcore segment ... --workers 0`` disk to disk (wall clock including
      process start, and the report's own seconds), output checked against ``bare``.
    - ``segment-w2``: the same with ``--workers 2`` (a two-worker Dask LocalCluster).
    - ``monai-0.25``, ``monai-0.5``: ``monai.inferers.sliding_window_inference`` in memory
      (gaussian blending, sw_batch_size 4, roi = ``--tile``).

    ``taskset -c 0 .venv/bin/python -m bench compare --model unet-w16 --size 2048 --tile 1024
    --amp none --repeats 3``

``io``
    The I/O ceiling: ``segcore segment`` with a zero-cost model (one 1x1 convolution) on a
    zlib-tiled TIFF, a JPEG-tiled SVS-like TIFF and a Zarr scene, beside the floors measured
    in one process on the same file (full decode, float32 normalisation, writing two uint8
    planes into a sharded zstd Zarr).

    ``taskset -c 0 .venv/bin/python -m bench io --size 4096 --tile 1024 --repeats 3``

``profile``
    ``segcore segment`` under pyinstrument (in-process, ``--workers 0``); the text profile
    shows where the time goes.

    ``taskset -c 0 .venv/bin/python -m bench profile --model unet-w16 --size 2048 --tile 1024``

Each run writes ``bench/results/<comparison>-<tag>.json`` (command line, date, git commit,
CPU model and flags, torch version and capability, threads, GPU) and a PNG plot, and prints a
markdown table for docs/BENCHMARKS.md. Scenes and checkpoints (random weights, seed 0) are
cached in ``--workdir`` (default /tmp/segcore-bench). ``--quick`` runs a tiny configuration
(tests/test_bench.py). monai, matplotlib, psutil and pyinstrument are optional (the ``bench``
extra): without them their contender, plot or sampling is skipped with a message.
"""
