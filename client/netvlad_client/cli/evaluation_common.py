"""What `evaluate` and `evaluate-retrieval` share: registering the subcommand, running it with
one-line errors, the --dims check before any work, and writing summary.json.

Both subcommands import from here (a shared module, not a subcommand), never from each other.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from netvlad_client.cli.common import EXIT_ERROR
from netvlad_client.evaluation import EvaluationError
from netvlad_client.options import Option, add_options

SUMMARY = "summary.json"


class Stopped(Exception):
    """Describing stopped early (error or interrupt); the message is out, `status` is the exit."""

    def __init__(self, status: int) -> None:
        super().__init__(status)
        self.status = status


def register_command(
    subparsers: Any,
    name: str,
    help_text: str,
    description: str,
    options: Sequence[Option],
    run: Callable[[argparse.Namespace], int],
) -> None:
    """Add one evaluation subcommand with its option table; it runs `run(args)`."""
    parser = subparsers.add_parser(name, help=help_text, description=description)
    add_options(parser, options)
    parser.set_defaults(func=run)


def run_command(name: str, execute: Callable[[], object]) -> int:
    """Run a subcommand's `execute`: 0 on success, the status of a stopped describe, or
    EXIT_ERROR with a one-line message naming the command.

    Server errors (NetVLADError) go up to `netvlad-client`'s own handler.
    """
    try:
        execute()
    except Stopped as stopped:
        return stopped.status
    except (EvaluationError, OSError) as exc:
        print(f"netvlad-client {name}: error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    return 0


def check_dims(dims: int | None, available: int, source: str) -> None:
    """--dims must not ask for more values than the descriptors have (checked before work)."""
    if dims is not None and dims > available:
        raise EvaluationError(
            f"--dims {dims} asks for more dimensions than the {available} of {source}; pass "
            f"--dims {available} or --dims all"
        )


def write_summary(out: Path, summary: dict[str, Any]) -> Path:
    """OUT/summary.json, indented, ending in a newline."""
    path = out / SUMMARY
    path.write_text(json.dumps(summary, indent=2) + "\n")
    return path
