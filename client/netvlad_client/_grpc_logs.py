"""Keep gRPC's C-core log lines off the stderr of `netvlad-client`, unless the user asks.

A TLS mismatch makes gRPC's core print lines such as `ssl_transport_security.cc:2563]
Handshake failed ...` on stderr, beside the CLI's own one-line error that already says what is
wrong. gRPC reads GRPC_VERBOSITY once, when the `grpc` module is first imported, so this runs
on importing the package, before anything imports grpc, and only when the process is the
`netvlad-client` program (`python -m netvlad_client.cli` included): a program using the library
keeps gRPC's behaviour. A GRPC_VERBOSITY the user set, or `--verbose`/`-v`, is left alone.
"""

from __future__ import annotations

import itertools
import os
import sys
from collections.abc import MutableMapping, Sequence
from pathlib import Path

PROGRAM = "netvlad-client"
VERBOSE_FLAGS = ("--verbose", "-v")


def is_the_cli(argv: Sequence[str], orig_argv: Sequence[str]) -> bool:
    """True when the process runs `netvlad-client` (the script, or `python -m ...cli`)."""
    if argv and Path(argv[0]).name.removesuffix(".exe") == PROGRAM:
        return True
    return any(flag == "-m" and module in ("netvlad_client.cli", "netvlad_client.cli.__main__")
               for flag, module in itertools.pairwise(orig_argv))


def quiet_grpc_logs(argv: Sequence[str], orig_argv: Sequence[str],
                    environ: MutableMapping[str, str]) -> bool:
    """Set GRPC_VERBOSITY=NONE for the CLI when nothing asks for gRPC's logs; True if set."""
    if not is_the_cli(argv, orig_argv) or "grpc" in sys.modules:
        return False
    if environ.get("GRPC_VERBOSITY") or any(arg in VERBOSE_FLAGS for arg in argv[1:]):
        return False
    environ["GRPC_VERBOSITY"] = "NONE"
    return True


quiet_grpc_logs(sys.argv, getattr(sys, "orig_argv", sys.argv), os.environ)
