"""The one harness that tests, `scripts/soak.py` and `netvlad-bench` use to run a server.

A free loopback port, a `python -m netvlad_server` process on it (log to a file, flags last
wins), waiting for the gRPC health service to say SERVING, reading /metrics, reading a process's
RSS and CPU time from /proc, pausing and stopping it. Only gRPC and the standard library: the
server runs in its own process, so nothing here imports netvlad_server or TensorFlow.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Mapping
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

LOOPBACK = "127.0.0.1"
_CLK_TCK = os.sysconf("SC_CLK_TCK")
_GRPC_THREADS = ("event_engine", "grpc")  # name prefixes of gRPC core's own threads
_SAMPLE = re.compile(r"^([A-Za-z_:][\w:]*)(?:\{(.*?)\})? (\S+)$", flags=re.M)
_LABEL = re.compile(r'(\w+)="([^"]*)"')


class ServerStartError(RuntimeError):
    """A server that exited or did not turn SERVING in time; the message holds its log's end."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        return sock.getsockname()[1]


def proc_status(pid: int | str = "self") -> dict[str, int]:
    """The kB-valued fields of /proc/PID/status (VmRSS, RssAnon, ...), in bytes."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        parts = value.split()
        if len(parts) == 2 and parts[1] == "kB":
            out[key] = int(parts[0]) * 1024
    return out


def rss_bytes(pid: int | str = "self") -> int:
    """Resident set size of a process (VmRSS), in bytes."""
    status = proc_status(pid)
    if "VmRSS" not in status:
        raise ProcessLookupError(f"process {pid} has no resident memory: it has exited")
    return status["VmRSS"]


def _cpu_seconds(stat_path: Path) -> float:
    """User + system CPU seconds from a /proc .../stat file (fields after the command name)."""
    fields = stat_path.read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK


def process_stats(pid: int) -> dict[str, float]:
    """RSS in MiB and CPU seconds (user + system) of a process."""
    return {"rss_mib": rss_bytes(pid) / 2**20, "cpu_seconds": _cpu_seconds(
        Path(f"/proc/{pid}/stat"))}


def thread_cpu(pid: int) -> dict[str, float]:
    """CPU seconds of a server's main thread (its asyncio event loop) and its gRPC I/O threads."""
    out = {"event_loop": 0.0, "grpc_io": 0.0}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            name = (task / "comm").read_text().strip()
            seconds = _cpu_seconds(task / "stat")
        except OSError:  # the thread ended meanwhile
            continue
        if task.name == str(pid):
            out["event_loop"] += seconds
        elif name.startswith(_GRPC_THREADS):
            out["grpc_io"] += seconds
    return out


def metrics_samples(text: str) -> list[tuple[str, dict[str, str], float]]:
    """Every sample of a Prometheus text page as (name, labels, value)."""
    return [(match[1], dict(_LABEL.findall(match[2] or "")), float(match[3]))
            for match in _SAMPLE.finditer(text)]


def read_metrics(url: str, timeout: float = 10.0) -> str:
    """The text of a /metrics page."""
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return response.read().decode()


def wait_serving(target: str, timeout: float = 180.0,
                 process: ServerProcess | None = None) -> None:
    """Block until the health service at `target` says SERVING.

    With `process`, stop early when it exits; either failure raises ServerStartError with the
    end of its log, since that is where the reason is.
    """
    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            if process is not None and process.process.poll() is not None:
                raise ServerStartError(f"the server exited with {process.process.returncode}; "
                                       f"its log {process.log}:\n{process.tail()}")
            try:
                answer = stub.Check(health_pb2.HealthCheckRequest(), timeout=2)
                if answer.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.2)
    tail = f"; its log {process.log}:\n{process.tail()}" if process is not None else ""
    raise ServerStartError(f"the server at {target} was not SERVING after {timeout:.0f} s{tail}")


class ServerProcess:
    """`python -m netvlad_server FLAGS` on 127.0.0.1, its output in `log`.

    port None picks a free port; metrics_port None picks a free one and 0 turns /metrics off.
    The loopback flags come first, so a later flag in `flags` wins; place indexes go beside the
    log (LOG.indexes/), never into the caller's working directory. `env` adds to this
    process's environment (TF_CPP_MIN_LOG_LEVEL defaults to 2: TensorFlow's start-up chatter).
    """

    def __init__(self, log: str | os.PathLike, *flags: str, port: int | None = None,
                 metrics_port: int | None = None, env: Mapping[str, str] | None = None) -> None:
        self.port = free_port() if port is None else port
        self.metrics_port = free_port() if metrics_port is None else metrics_port
        self.target = f"{LOOPBACK}:{self.port}"
        self.metrics_url = (f"http://{LOOPBACK}:{self.metrics_port}/metrics"
                            if self.metrics_port else "")
        self.log = Path(log)
        command = [sys.executable, "-m", "netvlad_server", "--host", LOOPBACK,
                   "--port", str(self.port), "--metrics-host", LOOPBACK,
                   "--metrics-port", str(self.metrics_port),
                   "--index-dir", str(self.log.with_name(self.log.name + ".indexes")), *flags]
        environment = {**os.environ, "TF_CPP_MIN_LOG_LEVEL":
                       os.environ.get("TF_CPP_MIN_LOG_LEVEL", "2"), **(env or {})}
        with open(self.log, "wb") as handle:
            self.process = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT,
                                            env=environment)

    @property
    def pid(self) -> int:
        """The server's process id."""
        return self.process.pid

    def wait_serving(self, timeout: float = 180.0) -> ServerProcess:
        """Block until SERVING (ServerStartError with the log if it exits or times out)."""
        wait_serving(self.target, timeout, self)
        return self

    def tail(self, lines: int = 40) -> str:
        """The end of the server's log, for failure messages."""
        if not self.log.exists():
            return ""
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])

    def metric(self, name: str, quiet: float = 0.1, **labels: str) -> float:
        """Sum of a metric's samples whose labels include `labels`, once it stopped changing.

        The server counts a call when its handler ends, which may be just after the client
        got the answer: the value is read again every `quiet` seconds until two reads agree.
        """
        value = self._metric_once(name, labels)
        while True:
            time.sleep(quiet)
            value, previous = self._metric_once(name, labels), value
            if value == previous:
                return value

    def _metric_once(self, name: str, labels: dict[str, str]) -> float:
        """One read of /metrics: the sum of the matching samples."""
        return sum(value for sample, found, value in metrics_samples(read_metrics(self.metrics_url))
                   if sample == name and labels.items() <= found.items())

    def rss_bytes(self) -> int:
        """The server's resident set size, in bytes."""
        return rss_bytes(self.pid)

    def pause(self) -> None:
        """Freeze the server (SIGSTOP): connections stay open, nothing is answered."""
        self.process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        """Let a paused server run again."""
        self.process.send_signal(signal.SIGCONT)

    def stop(self, timeout: float = 60.0) -> int:
        """SIGTERM (a graceful drain), SIGKILL if it has not exited after `timeout` s.

        Returns the exit code: 0 is a clean shutdown, negative the signal that ended it.
        """
        if self.process.poll() is None:
            self.resume()
            self.process.terminate()
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
