"""A real Prefect stack on loopback for the crash and load tests (test code, not product).

``PrefectStack`` starts ``prefect server start`` on a free 127.0.0.1 port (SQLite under the
test's folder), creates the ``segcore-process`` work pool from deployments/process-pool.json,
runs ``prefect --no-prompt deploy --all`` from the real prefect.yaml, starts and restarts
``prefect worker start`` processes, and runs flows in their own processes (``python -c``), as
a user would. Every process is started in its own session and stopped by its own process
group id; every wait is bounded. ``tree_rss`` samples the resident memory of a process tree.

``start_postgres()`` (before ``start_server``) puts the server on a throwaway PostgreSQL
cluster on 127.0.0.1, as production runs it: under several concurrent flow runs the SQLite
database answers ``database is locked`` and stalls the server for tens of seconds.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
PREFECT = str(BIN / "prefect")
PYTHON = str(BIN / "python")


PG_BIN_DIRS = ("/usr/lib/postgresql/15/bin", "/usr/local/bin", "/usr/bin")


def pg_bin(tool: str) -> str | None:
    for d in PG_BIN_DIRS:
        if (Path(d) / tool).exists():
            return str(Path(d) / tool)
    return shutil.which(tool)


def postgres_unavailable(tools: tuple[str, ...] = ("initdb", "postgres", "pg_isready",
                                                   "createdb")) -> str | None:
    """Why a throwaway PostgreSQL (with ``tools``) cannot run here (None: it can)."""
    import pwd

    if os.geteuid() != 0 or shutil.which("runuser") is None:
        return "needs root and runuser to start PostgreSQL as the postgres user"
    for tool in tools:
        if pg_bin(tool) is None:
            return f"PostgreSQL's {tool} is not installed"
    try:
        pwd.getpwnam("postgres")
    except KeyError:
        return "no postgres system user"
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop(proc: subprocess.Popen, sig: int = signal.SIGTERM, timeout: float = 20) -> None:
    """Stop a process started with ``start_new_session=True``, and its group."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, sig)
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pass
        except ProcessLookupError:
            pass
    try:  # whatever is left of the group (children of a process that has exited)
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    if proc.poll() is None:
        proc.wait(timeout=timeout)


def wait_for(pred, timeout: float, what: str, interval: float = 0.5, log: Path | None = None):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        v = pred()
        if v:
            return v
        time.sleep(interval)
    tail = log.read_text()[-4000:] if log and log.exists() else ""
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}\n{tail}")


def tree_rss(pid: int) -> int:
    """Resident bytes of a process and all its descendants (0 once it is gone)."""
    import psutil

    from bench.procs import tree_rss as process_tree_rss

    try:
        return process_tree_rss(psutil.Process(pid))
    except psutil.NoSuchProcess:
        return 0


class RssSampler:
    """Samples ``tree_rss(pid)`` on a thread every ``interval`` s; ``peak`` and ``samples``."""

    def __init__(self, pid: int, interval: float = 0.2) -> None:
        self.pid, self.interval = pid, interval
        self.samples: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        t0 = time.monotonic()
        while not self._stop.is_set():
            self.samples.append((time.monotonic() - t0, tree_rss(self.pid)))
            self._stop.wait(self.interval)

    def __enter__(self) -> RssSampler:
        self._t.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._t.join(timeout=5)

    @property
    def peak(self) -> int:
        return max((r for _, r in self.samples), default=0)


class PrefectStack:
    """Server, pool, deployments and workers; ``close()`` stops everything it started."""

    def __init__(self, root: Path, env: dict[str, str] | None = None) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        port = free_port()
        base = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
        base.update({
            "PREFECT_HOME": str(root / "prefect-home"),
            "PREFECT_API_URL": f"http://127.0.0.1:{port}/api",
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PREFECT_SERVER_UI_ENABLED": "false",
            "PREFECT_CLI_COLORS": "false",
            "PREFECT_LOGGING_LEVEL": "INFO",
            "COLUMNS": "200",
            "PYTHONUNBUFFERED": "1",
            # as in an activated virtualenv: job commands such as `prefect flow-run execute`
            "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        })
        base.update(env or {})
        self.env = base
        self.port = port
        self.procs: list[subprocess.Popen] = []
        self.worker: subprocess.Popen | None = None
        self.n_workers = 0
        self.server_env: dict[str, str] = {}
        self.database = "sqlite"
        self._pg: tuple[subprocess.Popen, Path] | None = None

    # -- processes --------------------------------------------------------------------------
    def popen(self, args: list[str], log: Path, env: dict | None = None) -> subprocess.Popen:
        with open(log, "ab") as fh:
            p = subprocess.Popen(args, cwd=ROOT, env={**self.env, **(env or {})}, stdout=fh,
                                 stderr=subprocess.STDOUT, start_new_session=True)
        self.procs.append(p)
        return p

    def run(self, args: list[str], timeout: float = 180, env: dict | None = None) -> str:
        r = subprocess.run(args, cwd=ROOT, env={**self.env, **(env or {})}, capture_output=True,
                           text=True, timeout=timeout)
        assert r.returncode == 0, (f"{args} failed ({r.returncode}):\n{r.stdout[-3000:]}\n"
                                   f"{r.stderr[-3000:]}")
        return r.stdout

    def start_postgres(self, timeout: float = 60) -> bool:
        """A fresh PostgreSQL cluster (trust auth, 127.0.0.1, fsync off) for the server;
        False (and SQLite stays) where it cannot run, with the reason printed."""
        why = postgres_unavailable()
        if why:
            print(f"[prefectstack] SQLite: {why}", flush=True)
            return False
        base = Path(tempfile.mkdtemp(prefix="segcore-pg-"))
        base.chmod(0o755)  # the postgres user must reach its data folder
        data = base / "data"
        data.mkdir()
        shutil.chown(data, "postgres", "postgres")
        as_pg = ["runuser", "-u", "postgres", "--"]
        subprocess.run([*as_pg, pg_bin("initdb"), "-D", str(data), "-A", "trust", "-U",
                        "postgres", "--no-sync"], check=True, capture_output=True, timeout=120)
        port = free_port()
        with open(self.root / "postgres.log", "ab") as fh:
            proc = subprocess.Popen(
                [*as_pg, pg_bin("postgres"), "-D", str(data), "-p", str(port), "-k", str(data),
                 "-c", "listen_addresses=127.0.0.1", "-c", "fsync=off"],
                stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
        self._pg = (proc, base)

        def ready():
            if proc.poll() is not None:
                raise AssertionError(f"postgres exited {proc.returncode}:\n"
                                     f"{(self.root / 'postgres.log').read_text()[-3000:]}")
            return subprocess.run([pg_bin("pg_isready"), "-h", "127.0.0.1", "-p", str(port)],
                                  capture_output=True).returncode == 0

        wait_for(ready, timeout, "PostgreSQL to accept connections", interval=0.3)
        subprocess.run([*as_pg, pg_bin("createdb"), "-h", "127.0.0.1", "-p", str(port), "-U",
                        "postgres", "prefect"], check=True, capture_output=True, timeout=60)
        self.server_env["PREFECT_API_DATABASE_CONNECTION_URL"] = \
            f"postgresql+asyncpg://postgres@127.0.0.1:{port}/prefect"
        self.database = "postgresql"
        return True

    def start_server(self, timeout: float = 120) -> None:
        log = self.root / "server.log"
        proc = self.popen([PREFECT, "server", "start", "--host", "127.0.0.1", "--port",
                           str(self.port), "--no-ui", "--no-scheduler", "--analytics-off"], log,
                          env=self.server_env)

        def healthy():
            if proc.poll() is not None:
                raise AssertionError(f"prefect server exited {proc.returncode}:\n"
                                     f"{log.read_text()[-4000:]}")
            try:
                with urllib.request.urlopen(f"{self.env['PREFECT_API_URL']}/health",
                                            timeout=2) as r:
                    return r.status == 200
            except OSError:
                return False

        wait_for(healthy, timeout, "the Prefect server to be healthy", log=log)

    def deploy(self, *names: str) -> str:
        """Create the work pool, then ``prefect deploy`` the named deployments of
        prefect.yaml (all of them when none is named)."""
        self.run([PREFECT, "work-pool", "create", "segcore-process", "--type", "process",
                  "--base-job-template", str(ROOT / "deployments" / "process-pool.json")])
        which = [a for n in names for a in ("--name", n)] or ["--all"]
        return self.run([PREFECT, "--no-prompt", "deploy", *which], timeout=300)

    def set_parameters(self, deployment: str, **params) -> None:
        """Add or replace parameters of a deployment (as an operator would in the UI)."""
        from prefect.client.schemas.actions import DeploymentUpdate

        with self.client() as c:
            d = c.read_deployment_by_name(deployment)
            c.update_deployment(d.id, DeploymentUpdate(parameters={**d.parameters, **params}))

    def start_worker(self, limit: int = 1, env: dict | None = None) -> subprocess.Popen:
        """A process worker polling the pool every second (``--limit`` flow runs at once)."""
        self.n_workers += 1
        log = self.root / f"worker-{self.n_workers}.log"
        self.worker = self.popen(
            [PREFECT, "worker", "start", "--pool", "segcore-process", "--limit", str(limit),
             "--name", f"w{self.n_workers}"], log,
            env={"PREFECT_WORKER_QUERY_SECONDS": "1", **(env or {})})
        self.worker_log = log
        return self.worker

    def python(self, code: str, log: Path, env: dict | None = None) -> subprocess.Popen:
        """``python -c code`` in its own session (a flow run by hand, as a user would)."""
        return self.popen([PYTHON, "-c", code], log, env)

    def client(self):
        from prefect.client.orchestration import SyncPrefectClient

        return SyncPrefectClient(self.env["PREFECT_API_URL"])

    def close(self) -> None:
        for p in reversed(self.procs):
            stop(p)
        if self._pg is not None:  # after the server: SIGINT is PostgreSQL's fast shutdown
            proc, base = self._pg
            stop(proc, signal.SIGINT)
            shutil.rmtree(base, ignore_errors=True)
