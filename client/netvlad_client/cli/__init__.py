"""`netvlad-client`: describe images through a running server, evaluate, show its model, health.

Layout: `common` (connection options, exit codes, input files) and `bulk` (the resumable bulk
describing path) are shared; each subcommand module (`describe`, `info_health`, `evaluate`,
`index`) has
its option table and a `register(subparsers)`, and none imports another. Global options (before
the subcommand) choose the server and the channel security; each has a NETVLAD_* environment
fallback (docs/OPTIONS.md). Errors end with a one-line message and a non-zero exit status.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping, Sequence

from netvlad_client import NetVLADError, __version__
from netvlad_client.cli import describe, evaluate, evaluate_retrieval, index, info_health
from netvlad_client.cli.common import CONNECTION_OPTIONS, EXIT_ERROR, EXIT_INTERRUPTED
from netvlad_client.options import add_options, parse_args

SUBCOMMANDS = (describe, info_health, evaluate, evaluate_retrieval, index)


def build_parser() -> argparse.ArgumentParser:
    """The netvlad-client parser with every subcommand."""
    parser = argparse.ArgumentParser(
        prog="netvlad-client",
        description="Describe images with a running netvlad-server, show its model, check health.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    add_options(parser, CONNECTION_OPTIONS)
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in SUBCOMMANDS:
        module.register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> int:
    """Entry point of `netvlad-client`; returns the exit status."""
    args = parse_args(build_parser(), argv, environ)
    try:
        return args.func(args)
    except NetVLADError as exc:
        print(f"netvlad-client: error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("netvlad-client: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
