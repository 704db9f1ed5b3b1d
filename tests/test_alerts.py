"""The Prometheus alerting rules: promtool checks and unit tests, and a real Prometheus using them.

deploy/prometheus/alerts.yml is checked with `promtool check rules`, its unit tests
(alerts_test.yml) run with `promtool test rules`, and every alert's shape (for, severity,
summary, one-line runbook) and test coverage (a case that fires, a series that stays quiet) is
checked here. Against real servers: the metrics and labels the rules read are exported, the
serving gauge follows the health service, and a real Prometheus with the shipped configuration
loads the rules, evaluates them without errors and raises the availability alerts for a dead
target, a server still loading and an idle server whose model thread stopped.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

import grpc
import numpy as np
import pytest
import yaml
from client_support import random_image
from conftest import free_port
from deploy_support import ROOT, poll, prometheus_get, run, running_prometheus, tool
from grpc_health.v1 import health_pb2, health_pb2_grpc
from netvlad_client import NetVLADClient, NetVLADRPCError
from netvlad_server.places.service import PLACES_SERVICE_NAME
from netvlad_server.service import SERVICE_NAME
from prometheus_client.parser import text_string_to_metric_families
from server_thread import ServerThread, tiny_config

PROMETHEUS_DIR = ROOT / "deploy" / "prometheus"
RULES = PROMETHEUS_DIR / "alerts.yml"
RULE_TESTS = PROMETHEUS_DIR / "alerts_test.yml"
PROMETHEUS_CONFIG = PROMETHEUS_DIR / "prometheus.yml"
PROMETHEUS_LABELS = {"instance", "job"}  # added by Prometheus to every scraped series


def alert_rules() -> list[dict]:
    """Every alerting rule of alerts.yml."""
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"] if "alert" in rule]


def rule_tests() -> list[dict]:
    """The test groups of alerts_test.yml."""
    return yaml.safe_load(RULE_TESTS.read_text())["tests"]


def series_instances(group: dict) -> set[str]:
    """The instance label of every input series of a rule test group."""
    series = " ".join(entry["series"] for entry in group["input_series"])
    return set(re.findall(r'instance="([^"]+)"', series))


# --- promtool ---------------------------------------------------------------------------------


def test_rules_pass_promtool_check():
    done = run(tool("promtool"), "check", "rules", str(RULES))
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"SUCCESS: {len(alert_rules())} rules found" in done.stdout, done.stdout


def test_rules_pass_their_promtool_unit_tests():
    done = run(tool("promtool"), "test", "rules", RULE_TESTS.name, cwd=PROMETHEUS_DIR)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS" in done.stdout and "FAILED" not in done.stdout, done.stdout


def test_shipped_config_loads_the_rules_and_passes_promtool():
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    assert config["rule_files"] == [RULES.name]
    done = run(tool("promtool"), "check", "config", str(PROMETHEUS_CONFIG))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS: 1 rule files found" in done.stdout, done.stdout
    assert f"SUCCESS: {len(alert_rules())} rules found" in done.stdout, done.stdout


def test_compose_mounts_the_rules_beside_the_config():
    command = [tool("docker-compose")]
    for files in (["docker-compose.yml"], ["docker-compose.yml", "docker-compose.cpu.yml"]):
        arguments = [a for name in files for a in ("-f", name)]
        done = run(*command, *arguments, "config")
        assert done.returncode == 0, done.stderr
        prometheus = yaml.safe_load(done.stdout)["services"]["prometheus"]
        assert "--config.file=/etc/prometheus/prometheus.yml" in prometheus["command"]
        assert f"{PROMETHEUS_CONFIG}:/etc/prometheus/prometheus.yml:ro" in prometheus["volumes"]
        assert f"{RULES}:/etc/prometheus/{RULES.name}:ro" in prometheus["volumes"], files


# --- the rules' shape and their tests ---------------------------------------------------------


def test_every_alert_has_for_severity_summary_and_a_one_line_runbook():
    rules = alert_rules()
    names = [rule["alert"] for rule in rules]
    assert len(names) == len(set(names)), f"duplicate alert names: {names}"
    for rule in rules:
        name = rule["alert"]
        assert re.fullmatch(r"\d+[smh]", rule.get("for", "")), f"{name}: no `for:` duration"
        assert rule["labels"]["severity"] in {"critical", "warning"}, name
        annotations = rule["annotations"]
        assert set(annotations) == {"summary", "runbook"}, name
        assert "{{ $labels.instance }}" in annotations["summary"], name
        runbook = annotations["runbook"]
        assert "\n" not in runbook and 40 < len(runbook) < 200, f"{name}: runbook {runbook!r}"
        assert ";" in runbook or ":" in runbook, f"{name}: say what to check, then what to do"


def test_every_alert_has_a_firing_case_and_a_quiet_one():
    rules = {rule["alert"] for rule in alert_rules()}
    firing: dict[str, set[str]] = {name: set() for name in rules}
    quiet_moments: dict[str, int] = dict.fromkeys(rules, 0)
    quiet_series: dict[str, int] = dict.fromkeys(rules, 0)
    for group in rule_tests():
        instances = series_instances(group)
        for case in group["alert_rule_test"]:
            name = case["alertname"]
            assert name in rules, f"{group['name']}: tests unknown alert {name}"
            expected = {alert["exp_labels"]["instance"] for alert in case["exp_alerts"]}
            if expected:
                firing[name] |= expected
                quiet_series[name] += len(instances - expected)
            else:
                quiet_moments[name] += 1
    for name in sorted(rules):
        assert firing[name], f"{name}: no case where it fires"
        assert quiet_series[name], f"{name}: no series that must stay quiet while it fires"
        assert quiet_moments[name], f"{name}: no moment (before `for:`) where it must be quiet"


def test_queue_limit_in_the_rules_is_the_shipped_max_queue_size():
    (rule,) = [r for r in alert_rules() if r["alert"] == "NetVLADQueueNearLimit"]
    (limit,) = re.findall(r"netvlad_queue_depth\{[^}]*\}\[5m\]\) / (\d+)\n", rule["expr"])
    env = dict(
        line.split("=", 1) for line in (ROOT / "deploy/netvlad.env").read_text().splitlines()
        if line and not line.startswith("#")
    )
    configmap = yaml.safe_load((ROOT / "deploy/k8s/configmap.yaml").read_text())["data"]
    assert env["NETVLAD_MAX_QUEUE_SIZE"] == limit, "deploy/netvlad.env and alerts.yml disagree"
    assert configmap["NETVLAD_MAX_QUEUE_SIZE"] == limit, "the k8s ConfigMap and alerts.yml disagree"


# --- real servers, real Prometheus ------------------------------------------------------------


@pytest.fixture(scope="module")
def loaded_server(tiny_model) -> Iterator[ServerThread]:
    """A SERVING in-process server (demo-tiny) with /metrics, after a good and a bad request."""
    with ServerThread(tiny_config(free_port()), lambda _config: tiny_model) as running:
        with NetVLADClient(running.target) as client:
            for seed in range(3):
                client.describe(random_image(seed))
            with pytest.raises(NetVLADRPCError, match="INVALID_ARGUMENT"):
                client.describe(np.zeros((8, 8, 3), np.uint8))
        yield running


def serving_gauge(server: ServerThread) -> dict[str, float]:
    """netvlad_serving by service, as the server's /metrics page shows it."""
    return {sample.labels["service"]: sample.value
            for family in text_string_to_metric_families(server.metrics_text())
            for sample in family.samples if sample.name == "netvlad_serving"}


def health_status(server: ServerThread, service: str) -> int:
    """The gRPC health status the server answers for `service`."""
    with grpc.insecure_channel(server.target) as channel:
        return health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=service), timeout=10).status


def stop_model_thread(server: ServerThread) -> None:
    """Make the batch scheduler die, as an unexpected failure would: health turns NOT_SERVING.

    The metrics observer raises after one batch, which ends the scheduler; the call itself
    still gets its answer.
    """
    def broken_observer(*_args: object) -> None:
        raise RuntimeError("test: the batch scheduler stops here")

    server.server.metrics.batch_done = broken_observer
    with NetVLADClient(server.target) as client:
        client.describe(random_image(0))
    not_serving = health_pb2.HealthCheckResponse.NOT_SERVING
    poll(lambda: health_status(server, SERVICE_NAME) == not_serving, 20,
         lambda: "health NOT_SERVING after the scheduler stopped")


def test_serving_gauge_follows_health(tiny_model):
    services = {SERVICE_NAME, PLACES_SERVICE_NAME}
    serving, not_serving = (health_pb2.HealthCheckResponse.SERVING,
                            health_pb2.HealthCheckResponse.NOT_SERVING)
    with ServerThread(tiny_config(free_port()), lambda _config: tiny_model,
                      load=False) as running:
        assert serving_gauge(running) == dict.fromkeys(services, 0.0)  # loading
        assert health_status(running, SERVICE_NAME) == not_serving
        running.load()
        assert serving_gauge(running) == dict.fromkeys(services, 1.0)
        assert health_status(running, SERVICE_NAME) == serving
        stop_model_thread(running)
        assert serving_gauge(running) == dict.fromkeys(services, 0.0)
        assert health_status(running, "") == not_serving


def test_rules_read_only_exported_metrics_and_labels(loaded_server):
    samples: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(loaded_server.metrics_text()):
        for sample in family.samples:
            samples.setdefault(sample.name, set()).update(sample.labels)
    for rule in alert_rules():
        expr = rule["expr"]
        for name, selector in re.findall(r"\b((?:netvlad|process)_\w+)(?:\{([^}]*)\})?", expr):
            assert name in samples, f"{rule['alert']}: {name} is not exported by netvlad-server"
            used = set(re.findall(r"(\w+)\s*[!=]~?", selector))
            unknown = used - samples[name] - PROMETHEUS_LABELS
            assert not unknown, f"{rule['alert']}: {name} has no label {unknown}"


def test_real_prometheus_evaluates_the_rules_and_raises_availability_alerts(
        loaded_server, tiny_model, tmp_path):
    dead = f"127.0.0.1:{free_port()}"
    with ServerThread(tiny_config(free_port()), lambda _config: tiny_model,
                      load=False) as loading, \
            ServerThread(tiny_config(free_port()), lambda _config: tiny_model) as broken:
        stop_model_thread(broken)  # loaded, NOT_SERVING, and nobody calls it from here on
        healthy = f"127.0.0.1:{loaded_server.config.metrics_port}"
        still_loading = f"127.0.0.1:{loading.config.metrics_port}"
        idle_not_serving = f"127.0.0.1:{broken.config.metrics_port}"
        with running_prometheus([healthy, still_loading, idle_not_serving, dead], tmp_path,
                                rule_files=[str(RULES)]) as prometheus:
            port = prometheus.port

            def rules_evaluated() -> list[dict]:
                groups = prometheus_get(port, "/api/v1/rules")["data"]["groups"]
                rules = [rule for group in groups for rule in group["rules"]]
                done = all(rule["lastEvaluation"] > "2000" for rule in rules)
                return rules if len(rules) == len(alert_rules()) and done else []

            rules = poll(lambda: prometheus.process.poll() is None and rules_evaluated(), 60,
                         lambda: f"Prometheus to evaluate the rules ({prometheus.log_tail()})")
            for rule in rules:
                assert rule["health"] == "ok", rule

            def alerts() -> dict[tuple[str, str], str]:
                found = prometheus_get(port, "/api/v1/alerts")["data"]["alerts"]
                return {(a["labels"]["alertname"], a["labels"]["instance"]): a["state"]
                        for a in found}

            wanted = {("NetVLADServerDown", dead), ("NetVLADModelNotLoaded", still_loading),
                      ("NetVLADNotServing", idle_not_serving)}
            raised = poll(lambda: wanted <= set(alerts()) and alerts(), 60,
                          lambda: f"alerts {sorted(wanted)}, got {alerts()}")
            assert set(raised) == wanted, raised
            assert set(raised.values()) == {"pending"}, "`for:` holds them pending at first"
