"""Thin client for the NetVLAD descriptor service; imports numpy, grpcio and protobuf only."""

from importlib.metadata import PackageNotFoundError, version

from netvlad_client.client import (
    AsyncNetVLADClient,
    ClientConfig,
    NetVLADClient,
    NetVLADError,
    NetVLADInputError,
    NetVLADRPCError,
    NetVLADUnavailableError,
    StreamResult,
)

try:
    __version__ = version("netvlad-service")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"

__all__ = [
    "AsyncNetVLADClient",
    "ClientConfig",
    "NetVLADClient",
    "NetVLADError",
    "NetVLADInputError",
    "NetVLADRPCError",
    "NetVLADUnavailableError",
    "StreamResult",
    "__version__",
]
