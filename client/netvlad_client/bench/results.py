"""netvlad-bench's results: the ratios its targets are stated in, the printed summary, the plot."""

from __future__ import annotations

from typing import Any

import numpy as np


def ceiling(raw: dict[str, Any], sizes: dict[int, int]) -> float:
    """Images/s of the raw model running exactly the batches the server formed, back to back."""
    images = sum(size * calls for size, calls in sizes.items())
    seconds = sum(raw["by_batch"][size]["seconds"] * calls for size, calls in sizes.items())
    return images / seconds


def summarise(results: dict[str, Any]) -> dict[str, Any]:
    """The ratios the targets are stated in, each with its target and whether it is met."""
    load, raw = results.get("load"), results.get("raw")
    single, base = results.get("single"), results.get("baseline")
    out: dict[str, Any] = {}
    if load and raw:
        value = load["images_per_second"] / ceiling(raw, load["batch_sizes"])
        out["server_vs_raw_at_formed_batches"] = {"value": value, "target": ">= 0.90",
                                                  "met": value >= 0.90}
        value = load["images_per_second"] / raw["float32_batch_1"]["images_per_second"]
        cosine = raw.get("cosine_server_vs_float32")
        out["server_vs_float32_one_at_a_time"] = {
            "value": value, "cosine_vs_float32": cosine, "target": ">= 5 with cosine >= 0.9999",
            "met": value >= 5 and cosine is not None and cosine >= 0.9999}
    if single and raw:
        value = single["latency"]["p50_ms"] / (1000 * raw["by_batch"][1]["seconds"])
        out["single_caller_median_vs_raw_batch_1"] = {"value": value, "target": "<= 1.10",
                                                      "met": value <= 1.10}
    if load and base:
        out["server_vs_no_batching"] = {"value": load["images_per_second"]
                                        / base["images_per_second"]}
    if results.get("memory"):
        memory = results["memory"]
        out["rss_growth_mib"] = {"value": memory["rss_end_mib"] - memory["rss_start_mib"],
                                 "requests": memory["requests"]}
    for label, part in results.get("priority", {}).get("servers", {}).items():
        for name, target in part["targets"].items():
            out[f"priority [{label}] {name}"] = target
    if results.get("overhead"):
        out["cpu_ms_per_request_outside_model"] = {
            "value": 1000 * results["overhead"]["total_cpu_seconds_per_request"]}
    return out


def plot(results: dict[str, Any], path: str) -> None:
    """Four panels: throughput against the references, latencies, batch sizes, RSS."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    settings = results["settings"]
    fig, axes = plt.subplots(2, 2, figsize=(12, 8.5))
    fig.suptitle(f"netvlad-bench: {settings['height']}x{settings['width']} {settings['encoding']}, "
                 f"{results.get('precision', '?')}, {settings['callers']} callers, "
                 f"model {settings['model']}")
    bars: dict[str, float] = {}
    raw, load = results.get("raw"), results.get("load")
    if raw:
        bars["float32\none at a time\n(raw)"] = raw["float32_batch_1"]["images_per_second"]
        bars[f"{raw['precision']}\nbatch 1 (raw)"] = raw["by_batch"][1]["images_per_second"]
    if results.get("baseline"):
        bars["server\nno batching"] = results["baseline"]["images_per_second"]
    if load:
        bars[f"server\n{settings['callers']} callers"] = load["images_per_second"]
        if raw:
            bars["raw at formed\nbatches (ceiling)"] = ceiling(raw, load["batch_sizes"])
    ax = axes[0][0]
    ax.bar(list(bars), list(bars.values()), color="tab:blue")
    ax.set_ylabel("images / s")
    ax.set_title("throughput")
    ax.tick_params(axis="x", labelsize=8)
    ax = axes[0][1]
    for name, label in (("load", f"{settings['callers']} callers"), ("single", "1 caller")):
        if results.get(name):
            ms = np.sort(results[name]["latencies_ms"])
            ax.plot(ms, np.arange(1, len(ms) + 1) / len(ms), label=label)
    if raw:
        ax.axvline(1000 * raw["by_batch"][1]["seconds"], color="k", linestyle=":",
                   label="raw batch-1 forward")
    ax.set_xlabel("latency (ms)")
    ax.set_ylabel("fraction of requests")
    ax.set_title("latency distribution")
    ax.legend()
    ax = axes[1][0]
    if load:
        sizes = load["batch_sizes"]
        ax.bar([str(s) for s in sizes], list(sizes.values()), color="tab:green")
    ax.set_xlabel("images per model call")
    ax.set_ylabel("model calls")
    ax.set_title("batch sizes formed (netvlad_batch_size)")
    ax = axes[1][1]
    if results.get("memory"):
        samples = np.array(results["memory"]["samples"])
        ax.plot(samples[:, 0], samples[:, 1], color="tab:red")
        ax.set_ylim(0, samples[:, 1].max() * 1.15)
    else:
        ax.text(0.5, 0.5, "not measured in this run", ha="center", transform=ax.transAxes)
    ax.set_xlabel("requests answered")
    ax.set_ylabel("server RSS (MiB)")
    ax.set_title("server memory")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def report(results: dict[str, Any]) -> str:
    """The human-readable summary printed at the end."""
    lines = [f"precision {results.get('precision')}, image {results['image_bytes']} bytes"]
    for name in ("load", "single", "baseline"):
        part = results.get(name)
        if part:
            lat = part["latency"]
            cpu = part.get("server_cpu_seconds_per_request")
            lines.append(
                f"{name:9s} {part['callers']} caller(s), {part['requests']} requests: "
                f"{part['images_per_second']:.2f} images/s, latency p50 {lat['p50_ms']:.1f} ms "
                f"p95 {lat['p95_ms']:.1f} p99 {lat['p99_ms']:.1f}, batches {part['batch_sizes']}"
                + (f", server CPU {1000 * cpu:.1f} ms/request" if cpu is not None else ""))
    if results.get("memory"):
        m = results["memory"]
        lines.append(f"memory    {m['requests']} requests: RSS {m['rss_start_mib']:.0f} -> "
                     f"{m['rss_end_mib']:.0f} MiB (max {m['rss_max_mib']:.0f}), second half "
                     f"{m['growth_second_half_mib_per_1000_requests']:+.1f} MiB per 1000 requests")
    if results.get("overhead"):
        o = {k: 1000 * v for k, v in results["overhead"].items()}
        lines.append(f"overhead  server CPU per request outside the model: "
                     f"{o['total_cpu_seconds_per_request']:.2f} ms (event loop "
                     f"{o['event_loop_cpu_seconds_per_request']:.2f}, gRPC I/O "
                     f"{o['grpc_io_cpu_seconds_per_request']:.2f}, decoding "
                     f"{o['decode_cpu_seconds_per_image']:.2f})")
    for label, part in results.get("priority", {}).get("servers", {}).items():
        idle, mixed = part["idle"]["latency"], part["mixed"]["latency"]
        lines.append(
            f"priority  [{label}]: interactive idle p50 {idle['p50_ms']:.1f} ms "
            f"({part['idle']['requests']} requests); under bulk p50 {mixed['p50_ms']:.1f} "
            f"p99 {mixed['p99_ms']:.1f} ms ({part['mixed']['requests']}); bulk "
            f"{part['bulk_alone_images_per_second']:.2f} images/s alone, "
            f"{part['bulk_mixed_images_per_second']:.2f} mixed")
    if results.get("raw"):
        r = results["raw"]
        for size, row in r["by_batch"].items():
            lines.append(f"raw       {r['precision']} batch {size}: {row['seconds']:.3f} s per "
                         f"call, {row['images_per_second']:.2f} images/s")
        lines.append(f"raw       float32 batch 1: "
                     f"{r['float32_batch_1']['images_per_second']:.2f} images/s")
    for name, value in results["summary"].items():
        lines.append(f"summary   {name}: " + ", ".join(
            f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in value.items()))
    return "\n".join(lines)
