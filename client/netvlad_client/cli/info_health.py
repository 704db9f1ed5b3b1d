"""`netvlad-client info` and `health`: what the server runs, and whether it is SERVING."""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

from google.protobuf import json_format

from netvlad_client import NetVLADError, queue_budget
from netvlad_client._proto import netvlad_pb2
from netvlad_client.cli.common import EXIT_ERROR, client_from_args
from netvlad_client.inputs import priority_name
from netvlad_client.options import Option, add_options

INFO_OPTIONS: tuple[Option, ...] = (
    Option(("--json",), "print the ModelInfo as JSON", default=False, kind="switch"),
)
HEALTH_OPTIONS: tuple[Option, ...] = (
    Option(("--service",), "health service name to ask about", default="",
           shown_default="the whole server"),
    Option(("--wait",), "keep asking until SERVING or this many seconds have passed",
           default=0.0, convert=float, metavar="SECONDS"),
)


def register(subparsers: Any) -> None:
    """Add `info` and `health`."""
    info = subparsers.add_parser("info", help="show the server's model and limits")
    add_options(info, INFO_OPTIONS)
    info.set_defaults(func=run_info)
    health = subparsers.add_parser("health", help="exit 0 only when the server is SERVING")
    add_options(health, HEALTH_OPTIONS)
    health.set_defaults(func=run_health)


def format_info(info: netvlad_pb2.ModelInfo) -> str:
    """ModelInfo as aligned human-readable lines."""
    limits = info.batching
    resize = info.default_resize
    resize_text = (
        f"fit longest side to {resize.longest_side} px" if resize.longest_side else "keep size"
    )
    rows = [
        ("model", info.model_name + ("   ** DEMO WEIGHTS: descriptors are meaningless **"
                                     if info.demo_weights else "")),
        ("weights", f"{info.weight_source} ({info.weight_format})"),
        ("output dims", f"{info.output_dims} (K={info.num_clusters} clusters x "
                        f"D={info.cluster_dim}, whitened)"),
        ("precision", f"{info.precision}" + (", XLA" if info.xla else "")),
        ("device", info.device),
        ("default resize", resize_text),
        ("max batch size", str(limits.max_batch_size)),
        ("max queue delay", f"{limits.max_queue_delay_ms:g} ms"),
        ("max queue size", f"{limits.max_queue_size} interactive, "
                           f"{queue_budget(info, 'bulk')[0]} bulk images"),
        ("default priority", f"{priority_name(info.default_priority)} (requests that name no "
                             "class)"),
        ("images/request", str(limits.max_images_per_request)),
        ("max image pixels", str(limits.max_image_pixels)),
        ("min image side", f"{limits.min_image_side} px"),
        ("max message", f"{limits.max_message_bytes} bytes"),
        ("server", f"{info.server_version} (TensorFlow {info.tensorflow_version})"),
    ]
    width = max(len(key) for key, _ in rows)
    return "\n".join(f"{key:<{width}}  {value}" for key, value in rows)


def run_info(args: argparse.Namespace) -> int:
    """`info`: the server's ModelInfo, readable or as JSON."""
    with client_from_args(args) as client:
        info = client.info()
    if args.json:
        fields = json_format.MessageToDict(
            info, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
        )
        print(json.dumps(fields, indent=2, sort_keys=True))
    else:
        print(format_info(info))
    return 0


def run_health(args: argparse.Namespace) -> int:
    """`health`: print the status; exit 0 only when SERVING (optionally wait for it)."""
    deadline = time.monotonic() + args.wait
    with client_from_args(args) as client:
        while True:
            try:
                status = client.health(args.service, timeout=min(args.timeout, 5.0))
                detail = ""
            except NetVLADError as exc:
                status, detail = ("UNREACHABLE", str(exc))
            if status == "SERVING" or time.monotonic() >= deadline:
                break
            time.sleep(0.5)
    print(status + (f": {detail}" if detail else ""))
    return 0 if status == "SERVING" else EXIT_ERROR
