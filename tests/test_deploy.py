"""Deployment files pass their ecosystems' checkers, and agree with the real server they deploy.

Static checks: hadolint (Dockerfile), docker-compose config, promtool check config,
kubernetes-validate (deploy/k8s). Real parts: netvlad-server processes on loopback ports, a real
Prometheus scraping one of them with the project's scrape config, and a client spreading calls
over two servers by round-robin.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import yaml
from client_support import ServerProcess, random_image
from deploy_support import (
    ROOT,
    assert_server_settings,
    compose_config,
    k8s_documents,
    poll,
    prometheus_get,
    run,
    running_prometheus,
    tool,
)
from netvlad_client import NetVLADClient, NetVLADRPCError
from netvlad_client.bench.harness import free_port
from prometheus_client.parser import text_string_to_metric_families

K8S = ROOT / "deploy" / "k8s"
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "netvlad.json"
PROMETHEUS_CONFIG = ROOT / "deploy" / "prometheus" / "prometheus.yml"
def dockerfile_instructions() -> list[tuple[str, str]]:
    """The Dockerfile as (INSTRUCTION, arguments) pairs, continuation lines joined."""
    text = re.sub(r"\\\n", " ", (ROOT / "Dockerfile").read_text())
    pairs = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            pairs.append((keyword.upper(), " ".join(rest.split())))
    return pairs


def healthcheck_command() -> list[str]:
    """The Dockerfile's HEALTHCHECK command (exec form)."""
    (healthcheck,) = [rest for key, rest in dockerfile_instructions() if key == "HEALTHCHECK"]
    return json.loads(healthcheck.partition("CMD ")[2])


# --- Dockerfile ------------------------------------------------------------------------------


def test_dockerfile_passes_hadolint():
    done = run(tool("hadolint"), "--no-color", "Dockerfile")
    assert done.returncode == 0 and not done.stdout.strip(), done.stdout + done.stderr


def test_dockerfile_shape():
    steps = dockerfile_instructions()
    args = dict(s[1].split("=", 1) for s in steps if s[0] == "ARG" and "=" in s[1])
    assert args["VARIANT"] == "gpu"
    assert re.fullmatch(r"python:\d+\.\d+\.\d+-slim-\w+", args["PYTHON_IMAGE"]), "pin the base"
    assert ("USER", "10001") in steps
    assert ("EXPOSE", "50051 9090") in steps
    assert ("ENTRYPOINT", '["netvlad-server"]') in steps
    assert "netvlad-client --target 127.0.0.1:${NETVLAD_PORT} health" in healthcheck_command()[-1]
    copied = " ".join(rest for keyword, rest in steps if keyword in ("COPY", "ADD"))
    assert "models" not in copied, "weights must be mounted, never baked into the image"
    env = dict(re.findall(r"(NETVLAD_\w+)=(\S+)", " ".join(r for k, r in steps if k == "ENV")))
    assert env["NETVLAD_MODEL"] == "/models/vd16_pitts30k_conv5_3_vlad_preL2_intra_white"
    assert_server_settings(env, "Dockerfile ENV")


def test_dockerignore_lets_only_the_sources_in():
    lines = [
        line for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line and not line.startswith("#")
    ]
    assert lines[0] == "*"
    allowed = {line[1:].rstrip("/") for line in lines if line.startswith("!")}
    assert allowed == {
        "pyproject.toml", "README.md", "scripts/image_requirements.py", "client", "server"
    }
    for path in allowed:
        assert (ROOT / path).exists(), path


@pytest.mark.parametrize("variant", ["gpu", "cpu"])
def test_image_requirements_pick_one_tensorflow_build(variant):
    done = run(sys.executable, "scripts/image_requirements.py", variant)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    tensorflow = [line for line in lines if line.startswith("tensorflow")]
    if variant == "gpu":
        assert tensorflow == ["tensorflow[and-cuda]==2.21.*"]
    else:
        builds = [t.split(";")[0] for t in tensorflow]
        assert builds == ["tensorflow-cpu==2.21.*", "tensorflow==2.21.*"]
    for package in ("grpcio", "prometheus-client", "opencv-python-headless", "numpy", "faiss-cpu"):
        assert any(line.startswith(package) for line in lines), package
    # --precision int8 runs on LiteRT, a CPU runtime: only the CPU image carries it
    assert any(line.startswith("ai-edge-litert") for line in lines) == (variant == "cpu")


# --- docker compose --------------------------------------------------------------------------


def test_compose_reserves_a_gpu_and_mounts_the_weights():
    services = compose_config("docker-compose.yml")["services"]
    assert set(services) == {"netvlad", "prometheus", "grafana"}
    netvlad = services["netvlad"]
    assert netvlad["deploy"]["resources"]["reservations"]["devices"] == [
        {"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}
    ]
    assert netvlad["build"]["args"] == {"VARIANT": "gpu"}
    assert f"{ROOT / 'models'}:/models:ro" in netvlad["volumes"]
    assert_server_settings(netvlad["environment"], "deploy/netvlad.env")
    for name in ("prometheus", "grafana"):
        image = services[name]["image"]
        assert re.search(r":v?\d+\.\d+\.\d+$", image), f"{name} image not pinned: {image}"


def test_compose_cpu_override_swaps_the_server_for_a_cpu_build():
    services = compose_config("docker-compose.yml", "docker-compose.cpu.yml")["services"]
    assert services["netvlad"]["profiles"] == ["gpu"], "the GPU service must not start by default"
    cpu = services["netvlad-cpu"]
    assert "profiles" not in cpu and "deploy" not in cpu
    assert cpu["build"]["args"] == {"VARIANT": "cpu"}
    assert cpu["networks"]["default"]["aliases"] == ["netvlad"]
    assert cpu["environment"] == services["netvlad"]["environment"]
    assert cpu["volumes"] == services["netvlad"]["volumes"]


def test_compose_mounts_what_grafana_and_prometheus_are_configured_for():
    services = compose_config("docker-compose.yml")["services"]
    datasource = yaml.safe_load(
        (ROOT / "deploy/grafana/provisioning/datasources/prometheus.yml").read_text()
    )["datasources"][0]
    provider = yaml.safe_load(
        (ROOT / "deploy/grafana/provisioning/dashboards/netvlad.yml").read_text()
    )["providers"][0]
    assert datasource["url"] == "http://prometheus:9090"
    dashboards = ROOT / "deploy/grafana/dashboards"
    assert f"{dashboards}:{provider['options']['path']}:ro" in services["grafana"]["volumes"]
    dashboard = json.loads(DASHBOARD.read_text())
    uids = {panel["datasource"]["uid"] for panel in dashboard["panels"]}
    assert uids == {datasource["uid"]}
    assert f"{PROMETHEUS_CONFIG}:/etc/prometheus/prometheus.yml:ro" in (
        services["prometheus"]["volumes"]
    )


# --- Prometheus ------------------------------------------------------------------------------


def test_prometheus_config_passes_promtool():
    done = run(tool("promtool"), "check", "config", str(PROMETHEUS_CONFIG))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS" in done.stdout


def test_prometheus_scrapes_the_compose_service_metrics_port():
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    targets = [t for job in config["scrape_configs"] for c in job["static_configs"]
               for t in c["targets"]]
    env = dict(
        line.split("=", 1) for line in (ROOT / "deploy/netvlad.env").read_text().splitlines()
        if line and not line.startswith("#")
    )
    assert targets == [f"netvlad:{env['NETVLAD_METRICS_PORT']}"]


# --- Kubernetes ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(k8s_documents()))
def test_k8s_manifest_passes_kubernetes_validate(name):
    done = run(tool("kubernetes-validate"), "--strict", str(K8S / name))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "passed" in done.stdout + done.stderr


def test_kustomization_lists_every_manifest():
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert kustomization["kind"] == "Kustomization"
    assert sorted(kustomization["resources"]) == sorted(k8s_documents())


def test_k8s_deployment_probes_gpu_and_settings():
    docs = k8s_documents()
    deployment = docs["deployment.yaml"]
    pod = deployment["spec"]["template"]
    container = pod["spec"]["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["grpc"] == {"port": 50051}, probe
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 300
    assert pod["spec"]["terminationGracePeriodSeconds"] >= 30
    assert pod["metadata"]["annotations"]["prometheus.io/port"] == "9090"
    mount = next(m for m in container["volumeMounts"] if m["mountPath"] == "/models")
    assert mount["readOnly"] is True
    claim = next(v for v in pod["spec"]["volumes"] if v["name"] == mount["name"])
    assert claim["persistentVolumeClaim"]["claimName"] == docs["pvc.yaml"]["metadata"]["name"]

    configmap = docs["configmap.yaml"]
    assert container["envFrom"] == [{"configMapRef": {"name": configmap["metadata"]["name"]}}]
    assert_server_settings(configmap["data"], "deploy/k8s/configmap.yaml")

    service = docs["service-headless.yaml"]
    assert service["spec"]["clusterIP"] == "None"
    assert service["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"]
    assert {p["port"] for p in service["spec"]["ports"]} == {50051, 9090}


def test_stop_grace_periods_outlast_the_server_drain():
    netvlad = compose_config("docker-compose.yml")["services"]["netvlad"]
    drain = float(netvlad["environment"]["NETVLAD_SHUTDOWN_GRACE_S"])
    assert netvlad["stop_signal"] == "SIGTERM"
    assert float(netvlad["stop_grace_period"].removesuffix("s")) > drain
    docs = k8s_documents()
    pod = docs["deployment.yaml"]["spec"]["template"]["spec"]
    drain = float(docs["configmap.yaml"]["data"]["NETVLAD_SHUTDOWN_GRACE_S"])
    pre_stop = float(pod["containers"][0]["lifecycle"]["preStop"]["exec"]["command"][-1])
    assert pod["terminationGracePeriodSeconds"] > pre_stop + drain


# --- real servers ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[ServerProcess]]:
    """Two netvlad-server processes on demo-tiny weights, SERVING."""
    logs = tmp_path_factory.mktemp("servers")
    started = [ServerProcess(free_port(), free_port(), logs / f"server{i}.log") for i in range(2)]
    try:
        for server in started:
            server.wait_serving()
        yield started
    finally:
        for server in started:
            server.stop()


def metric_labels(server: ServerProcess) -> dict[str, set[str]]:
    """Every sample name on the server's /metrics with the label names it carries."""
    url = f"http://127.0.0.1:{server.metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    return {
        sample.name: set(sample.labels)
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def exercise(server: ServerProcess, images: int) -> None:
    """Describe some images one by one and send one bad image, so every series has samples."""
    with NetVLADClient(server.target) as client:
        for seed in range(images):
            client.describe(random_image(seed))
        with pytest.raises(NetVLADRPCError, match="INVALID_ARGUMENT"):
            client.describe(np.zeros((8, 8, 3), np.uint8))


def dashboard_queries() -> list[str]:
    """Every PromQL expression of the Grafana dashboard (panels and template variables)."""
    dashboard = json.loads(DASHBOARD.read_text())
    queries = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    queries += [v["query"]["query"] for v in dashboard["templating"]["list"]]
    return queries


def test_dashboard_panels_cover_the_issue():
    dashboard = json.loads(DASHBOARD.read_text())
    text = " ".join(p["title"].lower() for p in dashboard["panels"])
    for topic in ("throughput", "latency", "batch size", "queue depth", "errors"):
        assert topic in text, topic
    queries = " ".join(dashboard_queries())
    for quantile in ("0.5", "0.95", "0.99"):
        assert f"histogram_quantile({quantile}, sum by (le) (rate(netvlad_request_duration" in (
            queries
        )


def test_dashboard_queries_name_only_exported_metrics(servers):
    server = servers[0]
    exercise(server, images=3)
    samples = metric_labels(server)
    for query in dashboard_queries():
        names = re.findall(r"\bnetvlad_\w+", query)
        assert names, query
        for name in names:
            assert name in samples, f"{name} (in {query}) is not exported by netvlad-server"
        for name, selector in re.findall(r"\b(netvlad_\w+)\{([^}]*)\}", query):
            used = set(re.findall(r"(\w+)\s*[!=]~?", selector)) - {"instance", "job"}
            assert used <= samples[name], f"{query}: labels {used - samples[name]} not on {name}"
        for grouping in re.findall(r"by \(([^)]*)\)", query):
            labels = {label.strip() for label in grouping.split(",")} - {"instance", "job"}
            assert any(labels <= samples[n] for n in names), f"{query}: no series has {labels}"


def test_round_robin_client_spreads_calls_over_two_servers(servers):
    before = [s.metric("netvlad_requests_total", method="DescribeImages", code="OK")
              for s in servers]
    calls = 12
    with NetVLADClient([s.target for s in servers]) as client:
        assert client.health() == "SERVING"
        for seed in range(calls):
            assert client.describe(random_image(seed)).shape == (1, 32)
    served = [
        s.metric("netvlad_requests_total", method="DescribeImages", code="OK") - b
        for s, b in zip(servers, before, strict=True)
    ]
    assert sum(served) == calls
    assert min(served) >= calls // 4, f"calls per server {served}: not round-robin"
    for server in servers:
        with NetVLADClient(server.target) as single:
            assert single.health() == "SERVING"


def test_dockerfile_healthcheck_command_reports_a_real_server(servers):
    command = healthcheck_command()
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    serving = subprocess.run(command, env={**os.environ, "PATH": path,
                                           "NETVLAD_PORT": str(servers[0].port)},
                             capture_output=True, text=True, timeout=60)
    assert serving.returncode == 0, serving.stdout + serving.stderr
    closed = subprocess.run(command, env={**os.environ, "PATH": path,
                                          "NETVLAD_PORT": str(free_port())},
                            capture_output=True, text=True, timeout=60)
    assert closed.returncode != 0


def test_dockerfile_healthcheck_under_mutual_tls_with_the_client_environment(tiny_model,
                                                                             tmp_path):
    """The README's recipe: with TLS on, NETVLAD_CLIENT_TLS_* let the same HEALTHCHECK connect."""
    from pki import make_pki
    from server_thread import ServerThread, tiny_config

    pki = make_pki(tmp_path / "pki")
    config = tiny_config(free_port(), tls_cert=str(pki.server.cert_path),
                         tls_key=str(pki.server.key_path), tls_client_ca=str(pki.ca.cert_path))
    command = healthcheck_command()
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    with ServerThread(config, lambda _config: tiny_model) as running:
        env = {**os.environ, "PATH": path, "NETVLAD_PORT": running.target.rsplit(":", 1)[1],
               "NETVLAD_CLIENT_RETRIES": "0"}
        plain = subprocess.run(command, env=env, capture_output=True, text=True, timeout=60)
        assert plain.returncode != 0  # a plaintext probe fails against TLS
        env.update(NETVLAD_CLIENT_TLS_CA=str(pki.ca.cert_path),
                   NETVLAD_CLIENT_TLS_CERT=str(pki.client.cert_path),
                   NETVLAD_CLIENT_TLS_KEY=str(pki.client.key_path),
                   NETVLAD_CLIENT_TLS_SERVER_NAME="localhost")
        secure = subprocess.run(command, env=env, capture_output=True, text=True, timeout=60)
        assert secure.returncode == 0, secure.stdout + secure.stderr
        assert secure.stdout.strip() == "SERVING"


@pytest.fixture
def prometheus(servers, tmp_path) -> Iterator[int]:
    """A real Prometheus on loopback scraping servers[0] with the project's scrape config."""
    with running_prometheus([f"127.0.0.1:{servers[0].metrics_port}"], tmp_path) as running:
        yield running.port


def test_real_prometheus_collects_the_netvlad_series(servers, prometheus):
    server = servers[0]

    def scraped_up() -> bool:
        result = prometheus_get(prometheus, "/api/v1/query", query="up")["data"]["result"]
        return any(r["metric"]["job"] == "netvlad" and r["value"][1] == "1" for r in result)

    poll(scraped_up, 30, "a first successful scrape of the server")
    exercise(server, images=4)
    expected = server.metric("netvlad_images_total")

    def images_seen() -> bool:
        result = prometheus_get(prometheus, "/api/v1/query", query="netvlad_images_total")
        values = [float(r["value"][1]) for r in result["data"]["result"]]
        return values == [expected]

    poll(images_seen, 30, f"Prometheus to report netvlad_images_total == {expected}")
    names = prometheus_get(prometheus, "/api/v1/label/__name__/values")["data"]
    for family in ("netvlad_requests_total", "netvlad_images_total", "netvlad_batch_size_bucket",
                   "netvlad_queue_wait_seconds_bucket", "netvlad_inference_seconds_bucket",
                   "netvlad_request_duration_seconds_bucket", "netvlad_queue_depth",
                   "netvlad_model_info"):
        assert family in names, family
    # Every dashboard query is valid PromQL to a real Prometheus, and throughput shows the load.
    for query in dashboard_queries():
        if query.startswith("label_values("):
            continue
        promql = query.replace("$__rate_interval", "1m").replace("$instance", ".*")
        answer = prometheus_get(prometheus, "/api/v1/query", query=promql)
        assert answer["status"] == "success", (query, answer)
    throughput = prometheus_get(
        prometheus, "/api/v1/query", query="sum(rate(netvlad_images_total[1m]))"
    )["data"]["result"]
    assert float(throughput[0]["value"][1]) > 0

