"""The gRPC health service as the clients read it, and waiting for a server to be SERVING.

A server listens before its model is loaded: health says NOT_SERVING and descriptor calls
answer UNAVAILABLE until then. `ServingWait` decides, poll after poll, whether to keep waiting;
the sync and async clients only make the calls and sleep.
"""

from __future__ import annotations

import time

import grpc
from grpc_health.v1 import health_pb2

from netvlad_client.config import ClientConfig
from netvlad_client.errors import (
    NetVLADInputError,
    NetVLADRPCError,
    NetVLADUnavailableError,
    rpc_error,
)

METHOD = "Health.Check"
SERVING = "SERVING"
# Answers that mean "not up yet": keep polling while waiting for SERVING.
_TRANSIENT = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
_MAX_POLL_S = 5.0


def health_request(service: str) -> health_pb2.HealthCheckRequest:
    """The Check request for a service ("" is the whole server)."""
    return health_pb2.HealthCheckRequest(service=service)


def status_name(response: health_pb2.HealthCheckResponse) -> str:
    """The health status enum name, e.g. "SERVING"."""
    return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)


def check_failed(exc: grpc.RpcError, config: ClientConfig) -> str:
    """A failed Check: SERVICE_UNKNOWN for a service the server does not know, else raise."""
    if exc.code() == grpc.StatusCode.NOT_FOUND:
        return health_pb2.HealthCheckResponse.ServingStatus.Name(
            health_pb2.HealthCheckResponse.SERVICE_UNKNOWN
        )
    raise rpc_error(METHOD, exc, config, 1) from None


class ServingWait:
    """The state of one `wait_until_serving`: deadline, polls made, the last answer."""

    def __init__(self, config: ClientConfig, timeout: float | None):
        if timeout is not None and (isinstance(timeout, bool) or timeout < 0):
            raise NetVLADInputError(
                f"wait_until_serving: timeout must be seconds >= 0 (or None), got {timeout!r}"
            )
        self.config = config
        self.timeout = timeout
        self._deadline = None if timeout is None else time.monotonic() + timeout
        self._delay = max(0.05, config.backoff)
        self.polls = 0
        self.last = "no answer"
        self.hint = ""  # what the last unreachable answer suggests is wrong (a TLS mismatch)

    def poll_timeout(self) -> float:
        """The deadline of the next health check (counts the poll)."""
        self.polls += 1
        if self._deadline is None:
            return _MAX_POLL_S
        return max(0.05, min(_MAX_POLL_S, self._deadline - time.monotonic()))

    def unreachable(self, error: NetVLADRPCError) -> None:
        """A check failed: keep waiting if the server is not up yet, else raise the error."""
        if error.code not in _TRANSIENT:
            raise error
        self.last = f"{error.code.name}: {error.details}"
        self.hint = getattr(error, "hint", "")

    def next_delay(self, status: str | None) -> float | None:
        """None once SERVING, else the seconds to sleep before the next poll.

        Raises NetVLADUnavailableError naming the last answer once the timeout has passed.
        """
        if status == SERVING:
            return None
        if status is not None:
            self.last = status
        remaining = None if self._deadline is None else self._deadline - time.monotonic()
        if remaining is not None and remaining <= 0:
            raise NetVLADUnavailableError(
                METHOD,
                f"not SERVING after {self.timeout:g} s (last answer: {self.last})",
                self.config.target,
                self.polls,
                self.hint if self.last.startswith("UNAVAILABLE") else "",
            )
        delay = self._delay
        self._delay = min(1.0, self._delay * 2)
        return delay if remaining is None else min(delay, remaining)
