"""Soak test: mixed valid, invalid and abandoned traffic from several processes for a fixed time.

Starts its own netvlad-server on 127.0.0.1 (demo-tiny weights by default: the soak is about the
serving machinery, and tiny shapes put many more requests through it than VGG16 would on a small
CPU), then runs WORKERS client processes for DURATION seconds. Each worker loops over:

- valid requests (1-4 images, raw pixels, PNG or JPEG) whose every row is checked against
  references the server gave at the start for the same image, one image per request;
- invalid requests (truncated and corrupt files, a header bomb, lying raw buffers, too many
  images, bad dims, bytes that are no message), each of which must end INVALID_ARGUMENT;
- abandoned requests (a deadline too short to finish, or a call cancelled mid-way).

The server's RSS is sampled every second; latency percentiles of valid requests are reported per
interval. Writes a JSON report and exits 1 if a valid request failed or got a wrong row, an invalid
one got anything but INVALID_ARGUMENT, or the server did not stop cleanly on SIGTERM.

    python scripts/soak.py --duration 600 --workers 4 --out docs/soak_600s.json
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import grpc
import numpy as np
from netvlad_client.bench.harness import ServerProcess, ServerStartError, rss_bytes

POOL_SIZES = ((48, 64), (64, 48), (40, 40), (72, 96))
ENCODINGS = ("raw", "png", "jpeg")
CODE_OK = "OK"
INVALID = "INVALID_ARGUMENT"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=600.0, help="seconds of traffic")
    parser.add_argument("--workers", type=int, default=4, help="client processes")
    parser.add_argument("--interval", type=float, default=None,
                        help="seconds per latency interval (default: duration / 10, at least 5)")
    parser.add_argument("--rate", type=float, default=0.0,
                        help="requests per second per worker; 0 = as fast as answers come "
                             "(use a rate to soak gently on a shared machine)")
    parser.add_argument("--invalid-share", type=float, default=0.3, help="share of invalid calls")
    parser.add_argument("--abandon-share", type=float, default=0.05,
                        help="share of calls abandoned by their caller")
    parser.add_argument("--model", default="demo-tiny", help="--model of the server")
    parser.add_argument("--precision", default="float32", help="--precision of the server")
    parser.add_argument("--atol", type=float, default=1e-5,
                        help="largest difference allowed between a row and its reference")
    parser.add_argument("--server-arg", action="append", default=[],
                        help="extra netvlad-server argument (repeatable), e.g. "
                             "--server-arg=--max-batch-size=16")
    parser.add_argument("--out", default=None, help="write the JSON report here")
    parser.add_argument("--seed", type=int, default=0, help="seed of the image pool")
    return parser.parse_args(argv)


def make_pool(seed: int = 0) -> list[np.ndarray]:
    """The RGB images every worker sends (uint8 [H, W, 3]), the same for a given seed."""
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in POOL_SIZES]


def encode(image: np.ndarray, encoding: str) -> bytes:
    """An RGB image as a PNG or JPEG file (OpenCV writes BGR)."""
    import cv2

    ok, data = cv2.imencode(".png" if encoding == "png" else ".jpg",
                            np.ascontiguousarray(image[:, :, ::-1]))
    assert ok
    return data.tobytes()


def image_message(pb, image: np.ndarray, encoding: str, files: dict, key: int, image_id: str):
    """An Image message: raw pixels, or the pool image's PNG/JPEG file."""
    if encoding == "raw":
        height, width, channels = image.shape
        return pb.Image(id=image_id, raw=pb.RawImage(data=image.tobytes(), height=height,
                                                     width=width, channels=channels))
    return pb.Image(id=image_id, encoded=files[(key, encoding)])


def invalid_requests(pb, pool: list[np.ndarray], files: dict, max_images: int) -> list:
    """Requests the server must answer INVALID_ARGUMENT (serialised bytes for the non-messages)."""
    png, jpeg = files[(0, "png")], files[(0, "jpeg")]
    one = pool[0]
    bomb = (b"\x89PNG\r\n\x1a\n\x00\x00\x00\x0dIHDR" + (70000).to_bytes(4, "big") * 2
            + b"\x08\x02\x00\x00\x00" + bytes(4))
    raw = pb.RawImage(data=one.tobytes()[:-7], height=one.shape[0], width=one.shape[1],
                      channels=3)
    single = [pb.Image(raw=pb.RawImage(data=bytes(16 * 16 * 3), height=16, width=16, channels=3))]
    return [
        pb.DescribeImagesRequest(images=[pb.Image(id="cut-png", encoded=png[: len(png) // 2])]),
        pb.DescribeImagesRequest(images=[pb.Image(id="cut-jpeg", encoded=jpeg[:200])]),
        pb.DescribeImagesRequest(images=[pb.Image(id="zeros", encoded=png[:40] + bytes(400))]),
        pb.DescribeImagesRequest(images=[pb.Image(id="bomb", encoded=bomb)]),
        pb.DescribeImagesRequest(images=[pb.Image(id="short-raw", raw=raw)]),
        pb.DescribeImagesRequest(images=[pb.Image(id="gif", encoded=b"GIF89a" + bytes(64))]),
        pb.DescribeImagesRequest(images=single * (max_images + 1)),
        pb.DescribeImagesRequest(images=single, dims=100_000),
        pb.DescribeImagesRequest(),
        b"\xff\xff\xff\xff",  # not a DescribeImagesRequest at all
    ]


@dataclass
class Record:
    """One call as a worker saw it."""

    finished: float  # seconds since the soak started
    kind: str  # valid | invalid | abandoned
    latency: float
    code: str
    wrong_rows: int = 0
    deviation: float = 0.0
    detail: str = ""


def worker(index: int, target: str, args: argparse.Namespace, references: dict, start: float,
           max_images: int, out: str) -> None:
    """One client process: loop over valid, invalid and abandoned calls until the time is up."""
    from netvlad_client._proto import netvlad_pb2 as pb
    from netvlad_client._proto import netvlad_pb2_grpc as pb_grpc

    rng = np.random.default_rng(1000 + index)
    pool = make_pool(args.seed)
    files = {(k, e): encode(image, e) for k, image in enumerate(pool) for e in ENCODINGS[1:]}
    bad = invalid_requests(pb, pool, files, max_images)
    records: list[Record] = []
    channel = grpc.insecure_channel(target)
    stub = pb_grpc.DescriptorServiceStub(channel)
    raw_call = channel.unary_unary("/netvlad.v1.DescriptorService/DescribeImages")
    end = start + args.duration
    pause = 1.0 / args.rate if args.rate > 0 else 0.0
    while time.time() < end:
        draw = rng.random()
        began = time.perf_counter()
        if draw < args.invalid_share:
            request = bad[int(rng.integers(len(bad)))]
            try:
                if isinstance(request, bytes):
                    raw_call(request, timeout=60)
                else:
                    stub.DescribeImages(request, timeout=60)
                code, detail = CODE_OK, "an invalid request was answered"
            except grpc.RpcError as exc:
                code, detail = exc.code().name, exc.details() or ""
            records.append(Record(time.time() - start, "invalid", time.perf_counter() - began,
                                  code, detail=detail if code != INVALID else ""))
        elif draw < args.invalid_share + args.abandon_share:
            key = int(rng.integers(len(pool)))
            request = pb.DescribeImagesRequest(images=[image_message(
                pb, pool[key], "raw", files, key, "abandoned")] * 4)
            call = stub.DescribeImages.future(request, timeout=float(rng.choice([0.001, 60.0])))
            time.sleep(float(rng.uniform(0.0, 0.01)))
            code = "CANCELLED" if call.cancel() else call.code().name
            records.append(Record(time.time() - start, "abandoned", time.perf_counter() - began,
                                  code))
        else:
            count = int(rng.integers(1, 5))
            picks = [(int(rng.integers(len(pool))), ENCODINGS[int(rng.integers(3))])
                     for _ in range(count)]
            request = pb.DescribeImagesRequest(images=[
                image_message(pb, pool[key], encoding, files, key, f"{key}/{encoding}/{i}")
                for i, (key, encoding) in enumerate(picks)])
            try:
                response = stub.DescribeImages(request, timeout=60)
                code, detail = CODE_OK, ""
            except grpc.RpcError as exc:
                response, code, detail = None, exc.code().name, exc.details() or ""
            latency = time.perf_counter() - began
            wrong, deviation = 0, 0.0
            if response is not None:
                ids = [d.id for d in response.descriptors]
                if ids != [image.id for image in request.images]:
                    wrong, detail = count, "ids out of order"
                for (key, encoding), descriptor in zip(picks, response.descriptors, strict=False):
                    diff = float(np.max(np.abs(np.asarray(descriptor.values, np.float32)
                                               - references[f"{key}/{encoding}"])))
                    deviation = max(deviation, diff)
                    wrong += diff > args.atol
            records.append(Record(time.time() - start, "valid", latency, code, wrong, deviation,
                                  detail))
        if pause:
            time.sleep(max(0.0, pause - (time.perf_counter() - began)))
    channel.close()
    Path(out).write_text(json.dumps([asdict(record) for record in records]))


def start_server(args: argparse.Namespace, log_path: Path) -> ServerProcess:
    """netvlad-server on 127.0.0.1 (metrics off), SERVING."""
    sizes = ",".join(f"{h}x{w}" for h, w in POOL_SIZES)
    server = ServerProcess(log_path, "--model", args.model, "--warmup-sizes", sizes,
                           "--precision", args.precision, *args.server_arg, metrics_port=0)
    try:
        return server.wait_serving(timeout=300)
    except ServerStartError as exc:
        server.stop()
        raise SystemExit(f"the server did not become SERVING: {exc}") from None


def take_references(target: str, seed: int) -> tuple[dict[str, np.ndarray], int]:
    """Each pool image in each encoding described alone; and the server's images-per-request."""
    from netvlad_client._proto import netvlad_pb2 as pb
    from netvlad_client._proto import netvlad_pb2_grpc as pb_grpc

    pool = make_pool(seed)
    files = {(k, e): encode(image, e) for k, image in enumerate(pool) for e in ENCODINGS[1:]}
    references = {}
    with grpc.insecure_channel(target) as channel:
        stub = pb_grpc.DescriptorServiceStub(channel)
        info = stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=60)
        for key, image in enumerate(pool):
            for encoding in ENCODINGS:
                request = pb.DescribeImagesRequest(images=[image_message(
                    pb, image, encoding, files, key, "reference")])
                answer = stub.DescribeImages(request, timeout=60)
                references[f"{key}/{encoding}"] = np.asarray(answer.descriptors[0].values,
                                                             np.float32)
    return references, info.batching.max_images_per_request


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0..100) of values, in milliseconds; NaN when empty."""
    return float(np.percentile(values, q) * 1000.0) if values else float("nan")


def summarise(records: list[dict], rss: list[tuple[float, int]], args: argparse.Namespace,
              interval: float) -> dict:
    """The report: totals per kind and code, latency per interval, RSS first/last/max/slope."""
    valid = [r for r in records if r["kind"] == "valid"]
    invalid = [r for r in records if r["kind"] == "invalid"]
    abandoned = [r for r in records if r["kind"] == "abandoned"]
    times = np.array([t for t, _ in rss], dtype=float)
    mib = np.array([value for _, value in rss], dtype=float) / 2**20
    intervals = []
    for i in range(int(np.ceil(args.duration / interval))):
        low, high = i * interval, (i + 1) * interval
        window = [r["latency"] for r in valid if low <= r["finished"] < high]
        inside = mib[(times >= low) & (times <= high)]
        intervals.append({"start_s": low, "valid_requests": len(window),
                          "p50_ms": percentile(window, 50), "p95_ms": percentile(window, 95),
                          "p99_ms": percentile(window, 99),
                          "rss_end_mib": float(inside[-1]) if len(inside) else float("nan")})
    settled = times >= min(interval, args.duration / 2)  # after the first interval
    slope = (float(np.polyfit(times[settled], mib[settled], 1)[0] * 60.0)
             if settled.sum() >= 3 else float("nan"))

    def codes(group: list[dict]) -> dict[str, int]:
        found: dict[str, int] = {}
        for record in group:
            found[record["code"]] = found.get(record["code"], 0) + 1
        return found

    valid_errors = [r for r in valid if r["code"] != CODE_OK or r["wrong_rows"]]
    return {
        "duration_s": args.duration, "workers": args.workers, "model": args.model,
        "precision": args.precision, "rate_per_worker": args.rate,
        "requests": len(records),
        "valid": {"count": len(valid), "codes": codes(valid), "errors": len(valid_errors),
                  "wrong_rows": sum(r["wrong_rows"] for r in valid),
                  "max_deviation": max((r["deviation"] for r in valid), default=0.0),
                  "first_errors": [f"{r['code']}: {r['detail']}" for r in valid_errors[:5]]},
        "invalid": {"count": len(invalid), "codes": codes(invalid),
                    "not_invalid_argument": sum(r["code"] != INVALID for r in invalid),
                    "first_others": [f"{r['code']}: {r['detail']}" for r in invalid
                                     if r["code"] != INVALID][:5]},
        "abandoned": {"count": len(abandoned), "codes": codes(abandoned)},
        "latency_intervals": intervals,
        "rss_mib": {"first": float(mib[0]), "last": float(mib[-1]), "max": float(mib.max()),
                    "after_first_interval": float(mib[settled][0]) if settled.any() else None,
                    "slope_mib_per_min": slope, "samples": len(mib)},
    }


def print_report(report: dict) -> None:
    """The report as a few readable lines and a latency table."""
    valid, invalid, rss = report["valid"], report["invalid"], report["rss_mib"]
    print(f"{report['requests']} requests in {report['duration_s']:.0f} s from "
          f"{report['workers']} workers ({report['model']}, {report['precision']})")
    print(f"valid: {valid['count']} {valid['codes']}, {valid['errors']} errors, "
          f"{valid['wrong_rows']} wrong rows, max deviation {valid['max_deviation']:.2e}")
    print(f"invalid: {invalid['count']} {invalid['codes']}")
    print(f"abandoned: {report['abandoned']['count']} {report['abandoned']['codes']}")
    print(f"server RSS MiB: first {rss['first']:.1f}, after first interval "
          f"{rss['after_first_interval']:.1f}, last {rss['last']:.1f}, max {rss['max']:.1f}, "
          f"slope {rss['slope_mib_per_min']:+.3f} MiB/min")
    print("| from (s) | valid requests | p50 ms | p95 ms | p99 ms | RSS at end (MiB) |")
    print("|---:|---:|---:|---:|---:|---:|")
    for row in report["latency_intervals"]:
        print(f"| {row['start_s']:.0f} | {row['valid_requests']} | {row['p50_ms']:.1f} | "
              f"{row['p95_ms']:.1f} | {row['p99_ms']:.1f} | {row['rss_end_mib']:.1f} |")


def main(argv: list[str] | None = None) -> int:
    """Run the soak; exit 0 only when every correctness property held."""
    args = parse_args(argv)
    interval = args.interval or max(5.0, args.duration / 10)
    workdir = Path(tempfile.mkdtemp(prefix="netvlad-soak-"))
    server = start_server(args, workdir / "server.log")
    clean_exit = False
    outs = [workdir / f"worker{i}.json" for i in range(args.workers)]
    try:
        references, max_images = take_references(server.target, args.seed)
        context = multiprocessing.get_context("spawn")
        start = time.time() + 2.0  # every worker starts its clock together
        workers = [context.Process(target=worker, args=(
            i, server.target, args, references, start, max_images, str(outs[i])))
            for i in range(args.workers)]
        for process in workers:
            process.start()
        rss: list[tuple[float, int]] = []
        while time.time() < start + args.duration:
            rss.append((max(0.0, time.time() - start), rss_bytes(server.pid)))
            time.sleep(1.0)
        for process in workers:
            process.join(120)
        rss.append((args.duration, rss_bytes(server.pid)))
        records = [r for out in outs if out.exists() for r in json.loads(out.read_text())]
    finally:
        clean_exit = server.stop(timeout=120) == 0
    report = summarise(records, rss, args, interval)
    report["references"] = {key: value.tolist() for key, value in references.items()}
    report["server_exit_clean"] = clean_exit
    report["workers_finished"] = sum(out.exists() for out in outs)
    report["server_log"] = str(workdir / "server.log")
    print_report(report)
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    ok = (report["valid"]["errors"] == 0 and report["invalid"]["not_invalid_argument"] == 0
          and clean_exit and report["workers_finished"] == args.workers
          and report["valid"]["count"] > 0 and report["invalid"]["count"] > 0)
    print("soak " + ("passed" if ok else "FAILED") + f"; server log {workdir / 'server.log'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
