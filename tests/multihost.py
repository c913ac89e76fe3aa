"""A multi-host test bed on one Linux machine: network namespaces joined by veth pairs and a
bridge, each namespace a "host" with its own address, working directory and TMPDIR.

Topology (every address on 10.77.0.0/24, the bridge lives in its own namespace ``sgc-net`` so
nothing is added to the machine's own network)::

    sgc-storage 10.77.0.2  S3-protocol server (moto)
    sgc-db      10.77.0.3  PostgreSQL (fresh data directory) + Prefect server on it
    sgc-sched   10.77.0.4  dask scheduler
    sgc-gpu1    10.77.0.5  dask worker ... --resources GPU=1   (fake GPU: CPU)
    sgc-gpu2    10.77.0.6  dask worker ... --resources GPU=1
    sgc-ctl     10.77.0.7  the client: flows run here

Each process is started with ``ip netns exec sgc-HOST``; inside, the working directories of
all *other* hosts are covered by an empty tmpfs (``ip netns exec`` gives every command its own
mount namespace), so a process that reads a path from another host's disk fails as it would on
real machines. The repository and its virtualenv stay visible (the software installed on every
host). Teardown kills every process group, deletes the namespaces (their veths go with them) and
removes the data directories; leftovers of an interrupted run (prefix ``sgc-``) are removed
before a new bed starts. Root only: :func:`unavailable_reason` says why not elsewhere.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from tests.prefectstack import pg_bin, postgres_unavailable

PREFIX = "sgc-"
NET_NS = f"{PREFIX}net"
BRIDGE = "br0"
SUBNET = "10.77.0"
HOSTS = {"storage": 2, "db": 3, "sched": 4, "gpu1": 5, "gpu2": 6, "ctl": 7}
REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
S3_PORT, PG_PORT, PREFECT_PORT, SCHED_PORT = 5000, 5432, 4200, 8786
AWS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
       "AWS_DEFAULT_REGION": "us-east-1"}


def ip(name: str) -> str:
    return f"{SUBNET}.{HOSTS[name]}"


def ns(name: str) -> str:
    return f"{PREFIX}{name}"


def _run(argv: Sequence[str], timeout: float = 20, check: bool = True
         ) -> subprocess.CompletedProcess:
    return subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout,
                          check=check)


def unavailable_reason() -> str | None:
    """Why the bed cannot run here (None: it can)."""
    if sys.platform != "linux":
        return "multi-host test bed needs Linux network namespaces"
    if os.geteuid() != 0:
        return "multi-host test bed needs root (ip netns add); CI runs `make test` as root"
    if shutil.which("ip") is None:
        return "multi-host test bed needs iproute2 (`ip`)"
    why = postgres_unavailable(("initdb", "postgres", "pg_isready", "createdb", "psql"))
    if why:
        return f"multi-host test bed: {why} (apt-get install postgresql)"
    probe = f"{PREFIX}probe-{os.getpid()}"
    try:
        r = _run(["ip", "netns", "add", probe], check=False)
        if r.returncode:
            return f"cannot create a network namespace here: {r.stderr.strip()}"
    finally:
        _run(["ip", "netns", "del", probe], check=False)
    return None


def cleanup_leftovers() -> list[str]:
    """Kill processes in, and delete, every namespace named ``sgc-*``; remove old bed dirs."""
    r = _run(["ip", "netns", "list"], check=False)
    gone = []
    for line in r.stdout.splitlines():
        name = line.split()[0] if line.split() else ""
        if not name.startswith(PREFIX):
            continue
        _kill_ns_pids(name)
        _run(["ip", "netns", "del", name], check=False)
        gone.append(name)
    for d in Path(tempfile.gettempdir()).glob(f"{PREFIX}bed-*"):
        shutil.rmtree(d, ignore_errors=True)
    return gone


def _kill_ns_pids(name: str) -> None:
    r = _run(["ip", "netns", "pids", name], check=False)
    for pid in r.stdout.split():
        try:
            os.kill(int(pid), signal.SIGKILL)
        except (ProcessLookupError, ValueError):
            pass


class Bed:
    """The running hosts. ``start`` / ``run`` a command on a host; ``close`` tears down."""

    def __init__(self) -> None:
        self.base = Path(tempfile.mkdtemp(prefix=f"{PREFIX}bed-"))
        self.base.chmod(0o755)  # postgres (another user) must traverse to its data dir
        self.procs: list[tuple[str, subprocess.Popen]] = []
        self.namespaces: list[str] = []

    # --- network -----------------------------------------------------------------------
    def up(self) -> None:
        _run(["ip", "netns", "add", NET_NS])
        self.namespaces.append(NET_NS)
        _run(["ip", "-n", NET_NS, "link", "add", BRIDGE, "type", "bridge"])
        _run(["ip", "-n", NET_NS, "link", "set", BRIDGE, "up"])
        _run(["ip", "-n", NET_NS, "link", "set", "lo", "up"])
        for name in HOSTS:
            n = ns(name)
            _run(["ip", "netns", "add", n])
            self.namespaces.append(n)
            # host end "eth0" in the host, bridge end "v-NAME" in sgc-net
            _run(["ip", "link", "add", "eth0", "netns", n, "type", "veth",
                  "peer", "name", f"v-{name}", "netns", NET_NS])
            _run(["ip", "-n", NET_NS, "link", "set", f"v-{name}", "master", BRIDGE])
            _run(["ip", "-n", NET_NS, "link", "set", f"v-{name}", "up"])
            _run(["ip", "-n", n, "addr", "add", f"{ip(name)}/24", "dev", "eth0"])
            _run(["ip", "-n", n, "link", "set", "eth0", "up"])
            _run(["ip", "-n", n, "link", "set", "lo", "up"])
            d = self.dir(name)
            (d / "tmp").mkdir(parents=True)
            d.chmod(0o755)
            (d / "tmp").chmod(0o1777)

    def set_link(self, name: str, up: bool) -> None:
        """Cut (or restore) a host's network: its eth0 down/up."""
        _run(["ip", "-n", ns(name), "link", "set", "eth0", "up" if up else "down"])

    # --- processes ---------------------------------------------------------------------
    def dir(self, name: str) -> Path:
        return self.base / name

    def env(self, name: str, extra: dict[str, str] | None = None) -> dict[str, str]:
        """A host's environment: its own HOME/TMPDIR/PREFECT_HOME, nothing from the test's."""
        d = self.dir(name)
        env = {
            "PATH": f"{VENV_BIN}:/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin",
            "HOME": str(d), "TMPDIR": str(d / "tmp"), "LANG": "C.UTF-8",
            "PREFECT_HOME": str(d / ".prefect"),
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PYTHONUNBUFFERED": "1",
        }
        env.update(extra or {})
        return env

    def _wrap(self, name: str, argv: Sequence[str], user: str | None) -> list[str]:
        others = " ".join(shlex.quote(str(self.dir(h))) for h in HOSTS if h != name)
        cmd = shlex.join(list(argv))
        if user:
            cmd = f"exec runuser -u {user} -- {cmd}"
        else:
            cmd = f"exec {cmd}"
        script = (f"for d in {others}; do mount -t tmpfs -o size=1m,mode=0755 sgc-hidden \"$d\""
                  f" || exit 97; done; cd {shlex.quote(str(self.dir(name)))} && {cmd}")
        return ["ip", "netns", "exec", ns(name), "sh", "-c", script]

    def start(self, name: str, argv: Sequence[str], env: dict[str, str] | None = None,
              user: str | None = None, label: str | None = None) -> subprocess.Popen:
        """Start a long-running process on a host (own process group; log in its dir)."""
        label = label or Path(argv[0]).name
        log = open(self.dir(name) / f"{label}.log", "ab")  # noqa: SIM115 - closed with proc
        p = subprocess.Popen(self._wrap(name, argv, user), env=self.env(name, env),
                             stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                             start_new_session=True)
        log.close()
        self.procs.append((f"{name}:{label}", p))
        return p

    def run(self, name: str, argv: Sequence[str], env: dict[str, str] | None = None,
            timeout: float = 60, user: str | None = None, check: bool = True
            ) -> subprocess.CompletedProcess:
        r = subprocess.run(self._wrap(name, argv, user), env=self.env(name, env),
                           capture_output=True, text=True, timeout=timeout)
        if check and r.returncode:
            raise RuntimeError(f"{name}: {shlex.join(list(argv))} exited {r.returncode}\n"
                               f"--- stdout\n{r.stdout[-4000:]}\n--- stderr\n{r.stderr[-4000:]}")
        return r

    def python(self, name: str, code: str, env: dict[str, str] | None = None,
               timeout: float = 60) -> str:
        return self.run(name, [str(VENV_BIN / "python"), "-c", code], env, timeout).stdout

    def _poll(self, src: str, attempt: str, timeout: float, pause: float) -> tuple[bool, float]:
        """Run ``attempt`` (a Python statement that raises OSError until the service answers)
        on host ``src`` every ``pause`` s for up to ``timeout`` s: (answered, seconds)."""
        code = ("import socket,sys,time,urllib.request\n"
                f"end=time.monotonic()+{timeout}\n"
                "while time.monotonic()<end:\n"
                "    try:\n"
                f"        {attempt}; sys.exit(0)\n"
                f"    except OSError: time.sleep({pause})\n"
                "sys.exit(1)\n")
        t0 = time.monotonic()
        r = self.run(src, [str(VENV_BIN / "python"), "-c", code], timeout=timeout + 10,
                     check=False)
        return r.returncode == 0, time.monotonic() - t0

    def wait_tcp(self, src: str, host: str, port: int, timeout: float = 60,
                 proc: subprocess.Popen | None = None) -> float:
        """Seconds until ``host:port`` accepts a connection from host ``src``."""
        ok, secs = self._poll(src, f"socket.create_connection(({host!r},{port}),1).close()",
                              timeout, 0.2)
        if not ok:
            raise TimeoutError(f"{host}:{port} not reachable from {src} in {timeout}s"
                               + (f" (process exited {proc.poll()})" if proc and proc.poll()
                                  is not None else "") + "\n" + self.logs())
        return secs

    def wait_http(self, src: str, url: str, timeout: float = 90) -> float:
        ok, secs = self._poll(src, f"urllib.request.urlopen({url!r},timeout=2).read()",
                              timeout, 0.5)
        if not ok:
            raise TimeoutError(f"{url} not healthy from {src} in {timeout}s\n" + self.logs())
        return secs

    def logs(self, tail: int = 1500) -> str:
        out = []
        for f in sorted(self.base.glob("*/*.log")):
            out.append(f"--- {f.relative_to(self.base)}\n{f.read_text(errors='replace')[-tail:]}")
        return "\n".join(out)

    def stop(self, label: str, timeout: float = 10) -> None:
        for lbl, p in self.procs:
            if lbl == label:
                _stop(p, timeout)

    def close(self) -> None:
        for _, p in reversed(self.procs):
            _stop(p, 1)  # then SIGKILL: the whole bed and its data go anyway
        for n in reversed(self.namespaces):
            _kill_ns_pids(n)
            _run(["ip", "netns", "del", n], check=False)
        shutil.rmtree(self.base, ignore_errors=True)


def _stop(p: subprocess.Popen, timeout: float) -> None:
    if p.poll() is not None:
        return
    try:
        os.killpg(p.pid, signal.SIGTERM)
        p.wait(timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        p.wait(5)
    except ProcessLookupError:
        pass


# --- the services -------------------------------------------------------------------------
HOSTS_SH = REPO / "deployments" / "hosts.sh"  # the recipe users run; the bed runs it too


def start_storage(bed: Bed) -> subprocess.Popen:
    return bed.start("storage", ["sh", str(HOSTS_SH), "storage"],
                     env={"HOST_IP": ip("storage")}, label="moto")


def start_postgres(bed: Bed) -> tuple[subprocess.Popen, str]:
    """A fresh PostgreSQL cluster in the db host's directory; returns (proc, data_dir)."""
    data = bed.dir("db") / "pgdata"
    data.mkdir()
    shutil.chown(data, "postgres", "postgres")
    bed.run("db", [pg_bin("initdb"), "-D", str(data), "-A", "trust", "-U", "postgres",
                   "--no-sync"], user="postgres", timeout=60)
    # the test subnet only (the other hosts: Prefect server on db, psql); trust, no passwords
    with open(data / "pg_hba.conf", "a") as f:
        f.write(f"host all all {SUBNET}.0/24 trust\n")
    p = bed.start("db", [pg_bin("postgres"), "-D", str(data), "-p", str(PG_PORT), "-k",
                         str(data), "-c", f"listen_addresses={ip('db')}", "-c", "fsync=off"],
                  user="postgres", label="postgres")
    return p, str(data)


def postgres_ready(bed: Bed, timeout: float = 30) -> None:
    bed.wait_tcp("db", ip("db"), PG_PORT, timeout)
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        r = bed.run("db", [pg_bin("pg_isready"), "-h", ip("db"), "-p", str(PG_PORT)],
                    user="postgres", check=False)
        if r.returncode == 0:
            break
        time.sleep(0.3)
    bed.run("db", [pg_bin("createdb"), "-h", ip("db"), "-p", str(PG_PORT), "-U", "postgres",
                   "prefect"], user="postgres")


def psql(bed: Bed, sql: str) -> list[list[str]]:
    r = bed.run("db", [pg_bin("psql"), "-h", ip("db"), "-p", str(PG_PORT), "-U", "postgres",
                       "-d", "prefect", "-At", "-F", "\t", "-c", sql], user="postgres")
    return [line.split("\t") for line in r.stdout.splitlines() if line]


def prefect_db_url() -> str:
    return f"postgresql+asyncpg://postgres@{ip('db')}:{PG_PORT}/prefect"


def start_prefect(bed: Bed) -> subprocess.Popen:
    return bed.start("db", [str(VENV_BIN / "prefect"), "server", "start", "--host", ip("db"),
                            "--port", str(PREFECT_PORT), "--no-ui"],
                     env={"PREFECT_API_DATABASE_CONNECTION_URL": prefect_db_url(),
                          "PREFECT_SERVER_API_HOST": ip("db")}, label="prefect-server")


def scheduler_address() -> str:
    return f"tcp://{ip('sched')}:{SCHED_PORT}"


# a worker that stops answering (host or link down) is removed after this long, and its tasks
# go to the others (Dask's default is 5 minutes; deployments/hosts.sh sets 15 s, the bed 10 s)
SCHEDULER_ENV = {"DASK_DISTRIBUTED__SCHEDULER__WORKER_TTL": "10s"}


def start_scheduler(bed: Bed) -> subprocess.Popen:
    return bed.start("sched", ["sh", str(HOSTS_SH), "scheduler"],
                     env={**SCHEDULER_ENV, "HOST_IP": ip("sched")}, label="scheduler")


def worker_env() -> dict[str, str]:
    """What a GPU host's worker needs: the object store and credentials, nothing else."""
    return {**AWS, "SEGCORE_S3_ENDPOINT_URL": f"http://{ip('storage')}:{S3_PORT}"}


def start_worker(bed: Bed, name: str) -> subprocess.Popen:
    return bed.start(name, ["sh", str(HOSTS_SH), "gpu-worker"],
                     env={**worker_env(), "SCHEDULER": scheduler_address(), "WORKER_NAME": name,
                          "HOST_IP": ip(name)}, label="worker")


def ctl_env() -> dict[str, str]:
    return {**worker_env(), "PREFECT_API_URL": f"http://{ip('db')}:{PREFECT_PORT}/api"}


def ctl_start(bed: Bed, *args: str, label: str = "ctl") -> subprocess.Popen:
    """Start ``tests/multihost_ctl.py ARGS`` on ctl in the background (``ctl_result`` reads it)."""
    return bed.start("ctl", [str(VENV_BIN / "python"), str(REPO / "tests" / "multihost_ctl.py"),
                             *args], env=ctl_env(), label=label)


def ctl_result(bed: Bed, p: subprocess.Popen, label: str = "ctl", timeout: float = 180) -> dict:
    try:
        rc = p.wait(timeout)
    except subprocess.TimeoutExpired as e:
        raise TimeoutError(f"ctl {label} still running after {timeout}s\n{bed.logs()}") from e
    text = (bed.dir("ctl") / f"{label}.log").read_text(errors="replace")
    if rc:
        raise RuntimeError(f"ctl {label} exited {rc}\n{text[-6000:]}\n{bed.logs()}")
    return json.loads(text.strip().splitlines()[-1])


READY = "READY: emit the arrival event now"  # tests/multihost_ctl.py trigger prints it


def wait_log(bed: Bed, host: str, label: str, needle: str, proc: subprocess.Popen,
             timeout: float = 120) -> float:
    """Seconds until ``needle`` appears in a process's log on ``host`` (it must still run)."""
    log = bed.dir(host) / f"{label}.log"
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if log.exists() and needle in log.read_text(errors="replace"):
            return time.monotonic() - t0
        if proc.poll() is not None:
            raise RuntimeError(f"{host} {label} exited {proc.returncode} before {needle!r}\n"
                               f"{log.read_text(errors='replace')[-6000:]}\n{bed.logs()}")
        time.sleep(0.3)
    raise TimeoutError(f"{host} {label}: no {needle!r} in {timeout}s\n{bed.logs()}")


def ctl(bed: Bed, *args: str, timeout: float = 180) -> dict:
    """Run ``tests/multihost_ctl.py ARGS`` on the ctl host; its last stdout line is JSON."""
    r = bed.run("ctl", [str(VENV_BIN / "python"), str(REPO / "tests" / "multihost_ctl.py"),
                        *args], env=ctl_env(), timeout=timeout, check=False)
    if r.returncode:
        raise RuntimeError(f"ctl {args} exited {r.returncode}\n--- stdout\n{r.stdout[-3000:]}"
                           f"\n--- stderr\n{r.stderr[-6000:]}\n{bed.logs()}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def measure(size: int = 384, repeats: int = 2) -> dict:
    """Batch wall time with 2 worker hosts, then 1 (gpu2's worker stopped), on one bed.
    ``python -m tests.multihost measure [SIZE] [REPEATS]`` (root); docs/SCALING.md quotes it."""
    cleanup_leftovers()
    bed = Bed()
    res: dict = {"size": size, "cpus": os.cpu_count()}
    try:
        bed.up()
        start_storage(bed)
        start_postgres(bed)
        start_scheduler(bed)
        for w in ("gpu1", "gpu2"):
            start_worker(bed, w)
        postgres_ready(bed)
        start_prefect(bed)
        bed.wait_tcp("ctl", ip("sched"), SCHED_PORT, 60)
        bed.wait_http("ctl", f"http://{ip('db')}:{PREFECT_PORT}/api/health", 120)
        first = ctl(bed, "batch", "measure", scheduler_address(), str(size), "3", timeout=400)
        res["first_batch_2_workers"] = first["remote_s"]
        res["local_threads"] = first["timings"]["local"]
        res["tiles"] = first["first"]["tiles_run"]
        for n in (2, 1):
            if n == 1:
                bed.stop("gpu2:worker")
            res[f"{n}_workers"] = [ctl(bed, "time", "measure", scheduler_address(),
                                       f"t{n}-{i}", timeout=400)["seconds"]
                                   for i in range(repeats)]
        res["load_average"] = os.getloadavg()
        return res
    finally:
        bed.close()


if __name__ == "__main__":
    if sys.argv[1:2] == ["measure"]:
        print(json.dumps(measure(*(int(a) for a in sys.argv[2:4]))))
    else:
        raise SystemExit("usage: python -m tests.multihost measure [SIZE] [REPEATS]")
