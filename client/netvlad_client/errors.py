"""The errors the client package raises, and the mapping from gRPC statuses to them.

Every failure reaches the caller as a `NetVLADError`: bad input before anything is sent
(`NetVLADInputError`), a non-OK answer (`NetVLADRPCError`), or no server at all
(`NetVLADUnavailableError`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import grpc

if TYPE_CHECKING:
    from netvlad_client.config import ClientConfig


class NetVLADError(Exception):
    """Base of every error this package raises; `code` is the gRPC status when there is one."""

    code: grpc.StatusCode | None = None
    details: str = ""


class NetVLADInputError(NetVLADError, ValueError):
    """An image or option was unusable before anything was sent (missing file, bad array...)."""


class NetVLADRPCError(NetVLADError):
    """The server (or the channel) answered a call with a non-OK gRPC status."""

    def __init__(self, method: str, code: grpc.StatusCode, details: str, target: str = ""):
        self.method = method
        self.code = code
        self.details = details or ""
        self.target = target
        self.images: list[str] = []  # the caller's names of the images the server refused
        where = f" ({target})" if target else ""
        super().__init__(f"{method}{where}: {code.name}: {self.details}")


class NetVLADUnavailableError(NetVLADRPCError):
    """The server could not be reached (UNAVAILABLE), even after the configured retries.

    `hint` says what is likely wrong when the failure points at a cause (a TLS mismatch), and
    ends the message.
    """

    def __init__(self, method: str, details: str, target: str, attempts: int, hint: str = ""):
        self.attempts = attempts
        self.hint = hint
        super().__init__(method, grpc.StatusCode.UNAVAILABLE, details, target)
        message = f"server at {target} unavailable after {attempts} attempt(s) ({method})"
        if hint:
            message += f": {details.rstrip('. ')}. Likely cause: {hint}"
        else:
            message += f": {details}"
        self.args = (message,)


def closed_error(kind: str) -> NetVLADError:
    """The error for a call made on a client after its `close()`."""
    return NetVLADError(
        f"this {kind} is closed; create a new client (or make calls inside its `with` block)"
    )


def status_code(number: int) -> grpc.StatusCode:
    """grpc.StatusCode for a numeric status (UNKNOWN for numbers gRPC does not define)."""
    for code in grpc.StatusCode:
        if code.value[0] == number:
            return code
    return grpc.StatusCode.UNKNOWN


def rpc_error(method: str, exc: grpc.RpcError, config: ClientConfig,
              attempts: int) -> NetVLADRPCError:
    """A NetVLADRPCError (or NetVLADUnavailableError) with the call's status and message.

    An unreachable server gets the configuration's guess at the cause (see
    `ClientConfig.connection_hint`): gRPC itself often says no more than "Socket closed".
    """
    code = exc.code() if hasattr(exc, "code") else grpc.StatusCode.UNKNOWN
    details = (exc.details() if hasattr(exc, "details") else "") or str(exc)
    if code == grpc.StatusCode.UNAVAILABLE:
        return NetVLADUnavailableError(method, details, config.target, attempts,
                                       config.connection_hint(details))
    return NetVLADRPCError(method, code, details, config.target)
