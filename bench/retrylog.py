"""What segcore's S3 retry warnings cost (segcore.io.uri.report_retries): s3fs's logger is
lowered to DEBUG so its retry records exist, and every s3fs call then makes a log record that
the filter drops. Measured side by side in one run: the cost of one s3fs DEBUG call with the
filter and with the libraries' default (logger disabled), interleaved, median of 7 x 200k
calls; and, for scale, one 1 KiB PUT through ``write_bytes_atomic`` to moto on loopback
(median of 200). A benchmark, not a test.

    .venv/bin/python bench/retrylog.py
"""

from __future__ import annotations

import logging
import os
import statistics
import time


def log_call_ns(n: int = 200_000, repeats: int = 7) -> dict[str, list[float]]:
    import segcore.io.uri  # noqa: F401 - installs the filter on "s3fs"

    lg = logging.getLogger("s3fs")
    level, filters = lg.level, list(lg.filters)

    def run() -> float:
        t0 = time.perf_counter()
        for _ in range(n):
            lg.debug("CALL: %s - %s - %s", "put_object", ("a",), {"Bucket": "b"})
        return (time.perf_counter() - t0) / n * 1e9

    res: dict[str, list[float]] = {"with the retry filter": [], "default (disabled)": []}
    try:
        for _ in range(repeats):
            lg.setLevel(level)
            lg.filters[:] = filters
            res["with the retry filter"].append(run())
            lg.setLevel(logging.NOTSET)
            lg.filters[:] = []
            res["default (disabled)"].append(run())
    finally:
        lg.setLevel(level)
        lg.filters[:] = filters
    return res


def put_ms(n: int = 200) -> list[float]:
    from moto.server import ThreadedMotoServer

    srv = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    srv.start()
    try:
        host, port = srv.get_host_and_port()
        url = f"http://{host}:{port}"
        os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing",
                          AWS_DEFAULT_REGION="us-east-1", SEGCORE_S3_ENDPOINT_URL=url)
        import boto3

        from segcore.io.uri import write_bytes_atomic

        boto3.client("s3", endpoint_url=url).create_bucket(Bucket="segcore-bench")
        for i in range(20):  # warm-up: client, connection pool
            write_bytes_atomic(f"s3://segcore-bench/warm/{i}", b"x" * 1024)
        out = []
        for i in range(n):
            t0 = time.perf_counter()
            write_bytes_atomic(f"s3://segcore-bench/k/{i}", b"x" * 1024)
            out.append((time.perf_counter() - t0) * 1e3)
        return out
    finally:
        srv.stop()


def main() -> None:
    for name, v in log_call_ns().items():
        print(f"s3fs DEBUG call, {name}: median {statistics.median(v):.0f} ns "
              f"(range {min(v):.0f}-{max(v):.0f})")
    p = put_ms()
    print(f"1 KiB PUT to moto on loopback: median {statistics.median(p):.2f} ms "
          f"(range {min(p):.2f}-{max(p):.2f})")


if __name__ == "__main__":
    main()
