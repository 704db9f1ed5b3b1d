"""netvlad-bench end to end on demo-tiny (real servers and requests, JSON, PNG); its harness."""

from __future__ import annotations

import json
import socket
import subprocess
import sys

import cv2
import numpy as np
import pytest
from netvlad_client.bench import cli as bench
from netvlad_client.bench import harness

# The mixed-load phase in miniature: 2 rounds of 1 s windows, 2 bulk callers of 4 images.
SMALL_PRIORITY = ("--priority-rounds", "2", "--priority-seconds", "1",
                  "--priority-idle-requests", "2", "--interactive-interval", "0.1",
                  "--bulk-callers", "2", "--bulk-images", "4")


def class_requests(metrics_url: str) -> dict[str, float]:
    """DescribeImages calls a server answered OK, by priority class (from its /metrics)."""
    counts = {"interactive": 0.0, "bulk": 0.0}
    for name, labels, value in harness.metrics_samples(harness.read_metrics(metrics_url)):
        if (name == "netvlad_class_requests_total" and labels["method"] == "DescribeImages"
                and labels["code"] == "OK"):
            counts[labels["class"]] += value
    return counts


def check_priority_server(part: dict, rounds: int) -> None:
    """One server's mixed-load results: complete, consistent, ratios computed from them."""
    idle, mixed = part["idle"], part["mixed"]
    assert idle["requests"] == 2 * rounds == len(idle["latencies_ms"])
    assert mixed["requests"] == len(mixed["latencies_ms"]) >= rounds  # at least one per window
    assert 0 < idle["latency"]["p50_ms"] <= idle["latency"]["p99_ms"]
    windows = part["bulk_windows"]
    assert len(windows["alone"]) == len(windows["mixed"]) == rounds
    assert all(images > 0 and seconds > 0
               for images, seconds in windows["alone"] + windows["mixed"])
    alone = sum(i for i, _ in windows["alone"]) / sum(s for _, s in windows["alone"])
    assert part["bulk_alone_images_per_second"] == pytest.approx(alone)
    targets = part["targets"]
    assert targets["interactive_p50_vs_idle"]["value"] == pytest.approx(
        mixed["latency"]["p50_ms"] / idle["latency"]["p50_ms"])
    assert targets["bulk_mixed_vs_alone"]["value"] == pytest.approx(
        part["bulk_mixed_images_per_second"] / alone)
    assert {t["target"] for t in targets.values()} == {"<= 3", "<= 5", ">= 0.85"}
    assert all(t["met"] == (t["value"] <= 3 if t["target"] == "<= 3" else
                            t["value"] <= 5 if t["target"] == "<= 5" else t["value"] >= 0.85)
               for t in targets.values())


def small_run(tmp_path, *extra: str) -> tuple[dict, np.ndarray | None]:
    """Run netvlad-bench with a handful of tiny requests; the JSON and the decoded PNG."""
    out, png = tmp_path / "bench.json", tmp_path / "bench.png"
    code = bench.main(["--model", "demo-tiny", "--precision", "float32", "--size", "32x48",
                       "--callers", "2", "--requests", "6", "--single-requests", "3",
                       "--rss-requests", "10", "--raw-repeats", "1", *SMALL_PRIORITY,
                       "--out", str(out),
                       "--plot", str(png), "--log-dir", str(tmp_path / "logs"), *extra])
    assert code == 0
    return json.loads(out.read_text()), cv2.imread(str(png)) if png.exists() else None


def test_bench_starts_servers_and_writes_json_and_plot(tmp_path):
    results, image = small_run(tmp_path)
    load, raw = results["load"], results["raw"]
    assert results["precision"] == results["model_info"]["precision"] == "float32"
    assert load["requests"] == 6 and load["callers"] == 2 and len(load["latencies_ms"]) == 6
    # The batch sizes come from the server's /metrics: together they hold exactly the 6 images.
    assert sum(int(size) * calls for size, calls in load["batch_sizes"].items()) == 6
    assert 0 < load["latency"]["p50_ms"] <= load["latency"]["p95_ms"] <= load["latency"]["p99_ms"]
    assert load["images_per_second"] > 0 and load["server_cpu_seconds"] > 0
    assert results["single"]["batch_sizes"] == {"1": 3}  # one caller: nothing to batch
    assert results["baseline"]["batch_sizes"] == {"1": 6}  # --max-batch-size 1
    memory = results["memory"]
    assert memory["samples"][0][0] == 0 and memory["samples"][-1][0] == 10
    assert all(rss > 50 for _, rss in memory["samples"])  # a TensorFlow process, in MiB
    assert set(raw["by_batch"]) == {"1", *load["batch_sizes"]}
    assert raw["cosine_server_vs_float32"] == pytest.approx(1.0, abs=1e-5)
    overhead = results["overhead"]  # CPU outside the model: server threads (10 ms ticks), decode
    parts = [overhead[f"{name}_cpu_seconds_per_request"] for name in ("event_loop", "grpc_io")]
    assert min(parts) >= 0 and overhead["decode_cpu_seconds_per_image"] > 0  # a JPEG by default
    assert overhead["total_cpu_seconds_per_request"] == pytest.approx(
        sum(parts) + overhead["decode_cpu_seconds_per_image"])
    check_priority_server(results["priority"]["servers"]["as configured"], rounds=2)
    summary = results["summary"]
    assert {"server_vs_raw_at_formed_batches", "server_vs_float32_one_at_a_time",
            "single_caller_median_vs_raw_batch_1", "server_vs_no_batching",
            "rss_growth_mib", "priority [as configured] interactive_p99_vs_idle"} <= set(summary)
    assert image is not None and image.shape[0] > 300 and image.shape[1] > 400
    assert len(np.unique(image.reshape(-1, 3), axis=0)) > 10  # drawn, not blank


def test_bench_drives_a_running_server(tiny_server_process, tmp_path):
    server = tiny_server_process
    metrics_url = f"http://127.0.0.1:{server.metrics_port}/metrics"
    before = class_requests(metrics_url)
    results, image = small_run(
        tmp_path, "--target", server.target, "--server-pid", str(server.process.pid),
        "--metrics-url", f"http://127.0.0.1:{server.metrics_port}/metrics",
        "--skip", "baseline,raw", "--encoding", "raw", "--plot", "")
    assert image is None
    assert {"load", "single", "memory"} <= set(results) and "baseline" not in results
    assert results["model_info"]["batching"]["max_images_per_request"] == 4  # that server's flag
    assert sum(int(size) * calls for size, calls in results["load"]["batch_sizes"].items()) == 6
    assert results["memory"]["requests"] == 10
    assert results["overhead"]["decode_cpu_seconds_per_image"] < 1e-3  # raw pixels: a view
    # The mixed-load phase ran on that server, its interactive requests in the interactive class.
    part = results["priority"]["servers"]["as configured"]
    check_priority_server(part, rounds=2)
    after = class_requests(metrics_url)
    assert after["interactive"] - before["interactive"] == (
        part["idle"]["requests"] + part["mixed"]["requests"]
        + (4 + 6) + (2 + 3) + 10)  # and the other phases' (warm-up + timed), priority unset
    assert after["bulk"] - before["bulk"] >= 2 * 2  # every window held bulk requests


def test_bench_priority_phase_alone_starts_one_server_per_flag_set(tmp_path):
    out = tmp_path / "bench.json"
    flag_sets = ["--max-batch-size 4", "--max-batch-size  2 --mixed-bulk-batch-size 2"]
    assert bench.main(["--model", "demo-tiny", "--precision", "float32", "--size", "32x48",
                       "--skip", "load,single,memory,baseline,raw", *SMALL_PRIORITY,
                       *(f"--priority-servers={flags}" for flags in flag_sets),
                       "--encoding", "png", "--out", str(out), "--plot", "",
                       "--log-dir", str(tmp_path / "logs")]) == 0
    results = json.loads(out.read_text())
    assert results["precision"] == "float32" and results["model_info"]["batching"][
        "max_batch_size"] == 4  # the first priority server answered GetModelInfo
    servers = results["priority"]["servers"]
    assert list(servers) == ["--max-batch-size 4", "--max-batch-size 2 --mixed-bulk-batch-size 2"]
    for part in servers.values():
        check_priority_server(part, rounds=2)
    assert results["priority"]["shape"]["bulk_images"] == 4
    logs = sorted((tmp_path / "logs").iterdir())
    assert [log.name for log in logs] == ["priority-1.log", "priority-2.log"]  # no other server
    assert "SERVING: max_batch_size 2" in logs[1].read_text()


@pytest.mark.parametrize(("argv", "message"), [
    (["--size", "240"], "expected HEIGHTxWIDTH"),
    (["--size", "240x320,480x640"], "--size takes one HEIGHTxWIDTH"),
    (["--skip", "raw,everything"], "unknown phase(s) everything"),
    (["--callers", "0"], "--callers must be at least 1"),
    (["--rss-requests", "0"], "--rss-requests must be at least 1 (use --skip"),
    (["--priority-servers=--max-batch-size 4", "--priority-servers=--max-batch-size  4"],
     "--priority-servers: each flag set once"),
    (["--target", "127.0.0.1:1", "--priority-servers=--max-batch-size 4"],
     "with --target the priority"),
    (["--interactive-interval", "-1"], "--interactive-interval at least 0"),
    (["--bulk-images", "0"], "--bulk-images must be at least 1"),
])
def test_bench_refuses_bad_options(argv, message, capsys):
    with pytest.raises(SystemExit):
        bench.parse_args(argv)
    assert message in capsys.readouterr().err


def test_bench_without_the_server_package_names_the_extra(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "netvlad_server.config", None)  # as if not installed
    assert bench.main(["--size", "32x48", "--plot", ""]) == 2
    err = capsys.readouterr().err
    assert "reads --size" in err and "pip install 'netvlad-service[server]'" in err


def test_bench_package_imports_neither_tensorflow_nor_the_server():
    code = ("import sys, netvlad_client.bench.cli, netvlad_client.bench.harness; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in "
            "('tensorflow', 'netvlad_server', 'cv2', 'matplotlib')))")
    found = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           check=True).stdout.strip()
    assert found == "[]"


# ---------------------------------------------------------------- the shared harness

def test_free_port_is_bindable_and_rss_is_read_from_proc():
    port = harness.free_port()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))
    status = harness.proc_status()
    assert harness.rss_bytes() > 10 * 2**20  # this Python process, in bytes
    assert status["RssAnon"] + status["RssFile"] <= status["VmRSS"] + status.get("RssShmem", 0)
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    with pytest.raises(FileNotFoundError):
        harness.rss_bytes(child.pid)  # reaped: no /proc entry


def test_metrics_samples_reads_names_labels_and_values():
    text = ('# HELP netvlad_images_total Images.\n# TYPE netvlad_images_total counter\n'
            'netvlad_images_total 12.0\n'
            'netvlad_batch_size_bucket{class="bulk",le="2.0"} 3.0\n'
            'netvlad_batch_size_bucket{le="+Inf"} 5.0\n')
    assert harness.metrics_samples(text) == [
        ("netvlad_images_total", {}, 12.0),
        ("netvlad_batch_size_bucket", {"class": "bulk", "le": "2.0"}, 3.0),
        ("netvlad_batch_size_bucket", {"le": "+Inf"}, 5.0)]


def test_a_server_that_cannot_start_fails_with_its_log(tmp_path):
    server = harness.ServerProcess(tmp_path / "server.log", "--max-batch-size", "0")
    with pytest.raises(harness.ServerStartError,
                       match=r"exited with 2(.|\n)*--max-batch-size: expected an integer"):
        server.wait_serving(timeout=120)
    assert server.stop() == 2
