"""The retry policy shared by the sync and async clients: what is retried, when, how long.

Only failures a later attempt can fix are retried: UNAVAILABLE (no server yet, a server still
loading its model or shutting down) and RESOURCE_EXHAUSTED carrying the `netvlad-busy` trailer
(the server's queue is full). gRPC's own RESOURCE_EXHAUSTED for an oversized message, like
every other error, would only fail again. The drivers (`NetVLADClient`, `AsyncNetVLADClient`)
only make the attempts and sleep; every decision is taken here.
"""

from __future__ import annotations

import random
import time
from collections.abc import Iterator
from typing import Any

import grpc

from netvlad_client.config import ClientConfig
from netvlad_client.errors import rpc_error

# Trailing metadata the server puts on a RESOURCE_EXHAUSTED that means "queue full, try again
# shortly", telling it apart from gRPC's own RESOURCE_EXHAUSTED for an oversized message.
BUSY_TRAILER = ("netvlad-busy", "queue-full")


def is_retryable(exc: grpc.RpcError) -> bool:
    """True for UNAVAILABLE and for a full queue (RESOURCE_EXHAUSTED with the busy trailer)."""
    code = exc.code() if hasattr(exc, "code") else None
    if code == grpc.StatusCode.UNAVAILABLE:
        return True
    if code != grpc.StatusCode.RESOURCE_EXHAUSTED or not hasattr(exc, "trailing_metadata"):
        return False
    return any(key == BUSY_TRAILER[0] for key, _ in exc.trailing_metadata() or ())


def backoff_delays(config: ClientConfig, endless: bool = False) -> Iterator[float]:
    """Exponential backoff with jitter: backoff, 2*backoff, ... capped at max_backoff.

    `config.retries` delays, or without end when `endless` (waiting for a server).
    """
    attempt = 0
    while endless or attempt < config.retries:
        delay = min(config.max_backoff, config.backoff * (2 ** min(attempt, 30)))
        yield delay * random.uniform(0.5, 1.0)
        attempt += 1


class CallAttempts:
    """The retry state of one unary call: the options of each attempt, the wait after a failure.

    Without `wait_for_ready`, `timeout` bounds each attempt and a retryable failure is tried
    again `retries` times. With it, `timeout` bounds the whole call, gRPC waits for the channel
    to connect, and retryable failures are tried again until that deadline.
    """

    def __init__(self, method: str, config: ClientConfig, timeout: float | None):
        self.method = method
        self.config = config
        self.timeout = timeout if timeout is not None else config.timeout
        self.attempts = 0
        self._delays = backoff_delays(config, endless=config.wait_for_ready)
        self._deadline = (
            time.monotonic() + self.timeout
            if config.wait_for_ready and self.timeout is not None
            else None
        )

    def _remaining(self) -> float | None:
        """Seconds left of the call's deadline (None: no deadline over all attempts)."""
        return None if self._deadline is None else self._deadline - time.monotonic()

    def options(self) -> dict[str, Any]:
        """Keyword arguments of the next attempt's stub call (counts the attempt)."""
        self.attempts += 1
        remaining = self._remaining()
        options: dict[str, Any] = {
            "timeout": self.timeout if remaining is None else max(remaining, 0.001),
            "metadata": self.config.metadata(),
        }
        if self.config.wait_for_ready:
            options["wait_for_ready"] = True
        return options

    def after_failure(self, exc: grpc.RpcError) -> float:
        """Seconds to wait before the next attempt; raises the call's NetVLADError if none."""
        delay = next(self._delays, None) if is_retryable(exc) else None
        remaining = self._remaining()
        if delay is not None and remaining is not None:
            delay = None if remaining <= 0 else min(delay, remaining)
        if delay is None:
            raise rpc_error(self.method, exc, self.config, self.attempts) from None
        return delay
