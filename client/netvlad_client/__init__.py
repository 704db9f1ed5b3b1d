"""Thin client for the NetVLAD descriptor service; imports numpy, grpcio and protobuf only.

Modules by concern: `errors` (the NetVLADError family), `config` (ClientConfig: every
connection option and its default), `inputs` (images and per-call options as messages),
`planning` (splitting a call into requests, decoding answers), `retry` (the retry policy),
`health` (health checks, waiting for SERVING), `streaming`, `client` (blocking client), `aio`
(asyncio client), `bulk` (many requests in flight).

Every request names a priority class: `priority="interactive"` (someone waits for the answer)
runs ahead of `"bulk"` (many requests back to back); None leaves it to the server's default.
"""

from importlib.metadata import PackageNotFoundError, version

# First, before any module below imports grpc: the CLI's quiet gRPC logs (see _grpc_logs).
from netvlad_client import _grpc_logs  # noqa: F401
from netvlad_client.aio import AsyncNetVLADClient
from netvlad_client.bulk import (
    bulk_priority,
    describe_concurrently,
    queue_budget,
    queue_safe_concurrency,
)
from netvlad_client.client import NetVLADClient
from netvlad_client.config import (
    DEFAULT_MAX_MESSAGE_BYTES,
    DEFAULT_PORT,
    DEFAULT_RETRIES,
    DEFAULT_TIMEOUT,
    ClientConfig,
    resolve_target,
)
from netvlad_client.errors import (
    NetVLADError,
    NetVLADInputError,
    NetVLADRPCError,
    NetVLADUnavailableError,
)
from netvlad_client.inputs import ImageInput, resize_policy
from netvlad_client.planning import plan_requests
from netvlad_client.retry import BUSY_TRAILER
from netvlad_client.streaming import StreamResult

try:
    __version__ = version("netvlad-service")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"

__all__ = [
    "BUSY_TRAILER",
    "DEFAULT_MAX_MESSAGE_BYTES",
    "DEFAULT_PORT",
    "DEFAULT_RETRIES",
    "DEFAULT_TIMEOUT",
    "AsyncNetVLADClient",
    "ClientConfig",
    "ImageInput",
    "NetVLADClient",
    "NetVLADError",
    "NetVLADInputError",
    "NetVLADRPCError",
    "NetVLADUnavailableError",
    "StreamResult",
    "__version__",
    "bulk_priority",
    "describe_concurrently",
    "plan_requests",
    "queue_budget",
    "queue_safe_concurrency",
    "resize_policy",
    "resolve_target",
]
