"""`ClientConfig`: the one definition of the client's connection options and their defaults.

Both clients and the CLI build their channel from it: target resolution (one address, a list
spread round-robin, or a gRPC URI), TLS credentials, the bearer token and channel arguments.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from netvlad_client.errors import NetVLADInputError
from netvlad_client.inputs import check_dims, priority_value, resize_policy

PemInput = str | os.PathLike[str] | bytes | None

DEFAULT_PORT = 50051
DEFAULT_TIMEOUT = 120.0
DEFAULT_RETRIES = 4
DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024
_TARGET_SCHEMES = ("dns:", "ipv4:", "ipv6:", "unix:", "unix-abstract:", "vsock:")
_HOST_PORT = re.compile(r"^(?:\[(?P<v6>[^\]]+)\]|(?P<host>[^:]+)):(?P<port>\d+)$")


@dataclass(frozen=True)
class ClientConfig:
    """Everything a client needs to open a channel and make calls; shared by sync and async.

    Construction validates every option and normalises it: `target` becomes one gRPC target,
    PEM inputs (bytes, PEM text or a file path) become bytes, `tls` is on whenever a TLS
    option is given, `dims=0` becomes None (all dimensions).

    - timeout: seconds per attempt (None: no deadline); with wait_for_ready, per call.
    - retries, backoff, max_backoff: UNAVAILABLE and a full queue are tried again up to
      `retries` times after backoff, 2*backoff, ... (capped at max_backoff) seconds.
    - wait_for_ready: a server that is not up yet or still loading its model is waited for,
      until the call's `timeout`, instead of failing after `retries` attempts.
    - dims, resize: defaults for every describe call.
    - priority: the class of every request unless a call names one: "interactive", "bulk", a
      `netvlad_pb2.Priority` value, or None (the server's default class). Kept as the wire
      value (0 = unspecified).
    """

    target: str
    timeout: float | None = DEFAULT_TIMEOUT
    retries: int = DEFAULT_RETRIES
    backoff: float = 0.2
    max_backoff: float = 5.0
    tls: bool = False
    root_certificates: PemInput = None
    client_certificate: PemInput = None
    client_key: PemInput = field(default=None, repr=False)  # secrets stay out of logs
    server_name: str | None = None
    token: str | None = field(default=None, repr=False)
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    dims: int | None = None
    resize: str | int | None = None
    wait_for_ready: bool = False
    priority: str | int | None = None

    def __post_init__(self) -> None:
        """Validate the options and read the PEM files once."""
        if (self.client_certificate is None) != (self.client_key is None):
            raise NetVLADInputError(
                "mutual TLS needs both a client certificate and its private key; got only the "
                + ("certificate" if self.client_key is None else "key")
            )
        _check_number("retries", self.retries, integer=True)
        _check_number("backoff", self.backoff)
        _check_number("max_backoff", self.max_backoff)
        _check_number("max_message_bytes", self.max_message_bytes, integer=True, positive=True)
        if self.timeout is not None:
            _check_number("timeout", self.timeout, positive=True, unit=" seconds (or None)")
        token = self.token
        if token is not None and (not token.strip() or "\n" in token.strip()):
            raise NetVLADInputError("the bearer token must be one non-empty line")
        if token is not None and not all(" " <= c <= "~" for c in token.strip()):
            raise NetVLADInputError("the bearer token must be printable ASCII (gRPC metadata "
                                    "carries no other characters)")
        check_dims(self.dims)
        resize_policy(self.resize)
        normalised = {
            "target": resolve_target(self.target),
            "tls": bool(self.tls or self.root_certificates or self.client_certificate
                        or self.server_name),
            "root_certificates": _read_pem(self.root_certificates, "TLS root CA"),
            "client_certificate": _read_pem(self.client_certificate, "client certificate"),
            "client_key": _read_pem(self.client_key, "client key"),
            "token": token.strip() if token else None,
            "dims": self.dims or None,
            "wait_for_ready": bool(self.wait_for_ready),
            "priority": priority_value(self.priority),
        }
        for name, value in normalised.items():
            object.__setattr__(self, name, value)

    @classmethod
    def build(cls, target: str | Sequence[str], **options: Any) -> ClientConfig:
        """The configuration for `target` and keyword options; unknown names are refused."""
        known = {f.name for f in dataclasses.fields(cls)} - {"target"}
        unknown = sorted(set(options) - known)
        if unknown:
            raise NetVLADInputError(
                f"unknown client option(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}"
            )
        return cls(target, **options)  # type: ignore[arg-type]  # resolved in __post_init__

    def channel_options(self) -> list[tuple[str, Any]]:
        """gRPC channel arguments: round-robin, message limits, reconnect pace, TLS name."""
        from netvlad_client import __version__

        options: list[tuple[str, Any]] = [
            ("grpc.lb_policy_name", "round_robin"),
            ("grpc.max_send_message_length", self.max_message_bytes),
            ("grpc.max_receive_message_length", self.max_message_bytes),
            # Reconnect at the pace of our own retries, so a server that comes up late is found.
            ("grpc.initial_reconnect_backoff_ms", max(1, int(self.backoff * 1000))),
            ("grpc.min_reconnect_backoff_ms", max(1, int(self.backoff * 1000))),
            ("grpc.max_reconnect_backoff_ms", max(1, int(self.max_backoff * 1000))),
            ("grpc.primary_user_agent", f"netvlad-client/{__version__}"),
        ]
        if self.server_name:
            options.append(("grpc.ssl_target_name_override", self.server_name))
        return options

    def credentials(self) -> grpc.ChannelCredentials | None:
        """TLS channel credentials, or None for a plaintext channel."""
        if not self.tls:
            return None
        return grpc.ssl_channel_credentials(
            root_certificates=self.root_certificates,  # type: ignore[arg-type]
            private_key=self.client_key,  # type: ignore[arg-type]
            certificate_chain=self.client_certificate,  # type: ignore[arg-type]
        )

    def channel(self) -> grpc.Channel:
        """A blocking channel (plaintext or TLS) to the target."""
        credentials, options = self.credentials(), self.channel_options()
        if credentials is None:
            return grpc.insecure_channel(self.target, options=options)
        return grpc.secure_channel(self.target, credentials, options=options)

    def aio_channel(self) -> grpc.aio.Channel:
        """An asyncio channel (plaintext or TLS) to the target; open it inside the event loop."""
        credentials, options = self.credentials(), self.channel_options()
        if credentials is None:
            return grpc.aio.insecure_channel(self.target, options=options)
        return grpc.aio.secure_channel(self.target, credentials, options=options)

    def connection_hint(self, details: str) -> str:
        """What an unreachable server's gRPC details suggest is wrong with this configuration.

        A TLS mismatch reaches the client only as UNAVAILABLE, often with no more than "Socket
        closed" (the server hung up during the handshake); "" when nothing points at a cause.
        """
        text = details.lower()
        if "hostname verification" in text or "no match found for server name" in text:
            return ("the server's certificate does not name the host this client connects to; "
                    "connect by a name the certificate holds, or name one with --tls-server-name "
                    "NAME (server_name= in Python)")
        if "certificate_verify_failed" in text:
            return ("the server's certificate is not signed by a CA this client trusts; pass the "
                    "CA that signed it with --tls-ca FILE (root_certificates= in Python)")
        if self.tls and ("wrong_version_number" in text or "handshake failed" in text):
            return ("the server does not speak TLS (a plaintext server?); connect without "
                    "--tls/--tls-ca/--tls-cert, or start the server with --tls-cert and --tls-key")
        if "socket closed" not in text:
            return ""
        if not self.tls:
            return ("the server may require TLS, and this client connected in plaintext; pass the "
                    "CA that signed the server's certificate with --tls-ca FILE (or --tls for a "
                    "public CA; root_certificates= or tls=True in Python)")
        if self.client_certificate is None:
            return ("the server may require a client certificate (mutual TLS); pass --tls-cert "
                    "FILE and --tls-key FILE (client_certificate= and client_key= in Python)")
        return ("the server may not accept this client certificate (mutual TLS): it must be "
                "signed by the CA the server trusts for clients (its --tls-client-ca)")

    def metadata(self) -> tuple[tuple[str, str], ...]:
        """Per-call metadata: the bearer token when one is configured."""
        return (("authorization", f"Bearer {self.token}"),) if self.token else ()


def _check_number(name: str, value: object, *, integer: bool = False, positive: bool = False,
                  unit: str = "") -> None:
    """Refuse a non-number, a float where an integer belongs, a negative (or zero) value."""
    kinds = (int,) if integer else (int, float)
    bad = isinstance(value, bool) or not isinstance(value, kinds)
    if bad or value < 0 or (positive and value == 0):  # type: ignore[operator]
        what = "an integer" if integer else "a number"
        bound = "> 0" if positive else ">= 0"
        raise NetVLADInputError(f"{name} must be {what} {bound}{unit}, got {value!r}")


def _with_port(address: str) -> str:
    """`address` as HOST:PORT; a host (name, IPv4 or IPv6 literal) alone gets port 50051."""
    if _HOST_PORT.match(address):
        return address
    bare = address[1:-1] if address.startswith("[") and address.endswith("]") else address
    try:
        if ipaddress.ip_address(bare).version == 6:
            return f"[{bare}]:{DEFAULT_PORT}"
    except ValueError:
        pass
    if bare and ":" not in bare and "[" not in bare and "]" not in bare:
        return f"{bare}:{DEFAULT_PORT}"
    raise NetVLADInputError(
        f"server address {address!r} is not HOST[:PORT]; expected e.g. "
        f"{address.split(':')[0].strip('[]') or 'localhost'}:{DEFAULT_PORT}, or [IPv6]:PORT "
        f"(the port defaults to {DEFAULT_PORT})"
    )


def resolve_target(target: str | Sequence[str]) -> str:
    """Turn "host[:port]", "a:p,b:p", a list of addresses or a gRPC URI into one gRPC target.

    A missing port is 50051. Several addresses become gRPC's multi-address `ipv4:`/`ipv6:`
    target (IP literals only); the channel's round_robin policy then spreads calls over all of
    them. For host names, use one DNS name resolving to every server: `dns:///name:port`.
    """
    if isinstance(target, str):
        target = target.strip()
        if target.startswith(_TARGET_SCHEMES):
            return target
        addresses = [part.strip() for part in target.split(",") if part.strip()]
    elif isinstance(target, Sequence):
        addresses = [str(part).strip() for part in target]
    else:
        raise NetVLADInputError(
            f"target must be 'HOST[:PORT]', a comma-separated list or a list of addresses; got "
            f"{type(target).__name__}"
        )
    if not addresses:
        raise NetVLADInputError("no server address given (expected HOST[:PORT])")
    addresses = [_with_port(address) for address in addresses]
    if len(addresses) == 1:
        return addresses[0]
    families = set()
    for address in addresses:
        match = _HOST_PORT.match(address)
        host = match and (match["v6"] or match["host"])
        try:
            families.add(ipaddress.ip_address(host).version if host else None)
        except ValueError:
            families.add(None)
    if None in families or len(families) != 1:
        raise NetVLADInputError(
            f"several addresses must all be IPv4 or all IPv6 literals "
            f"(e.g. 10.0.0.1:50051,10.0.0.2:50051); got {addresses}. For host names use one DNS "
            "name that resolves to every server: dns:///name:port"
        )
    return f"ipv{families.pop()}:" + ",".join(addresses)


def _read_pem(value: PemInput, what: str) -> bytes | None:
    """PEM bytes from bytes, PEM text or a file path; a clear error for a missing file."""
    if value is None or isinstance(value, bytes):
        return value
    if isinstance(value, str) and value.lstrip().startswith("-----BEGIN"):
        return value.encode()
    path = Path(value)
    try:
        return path.read_bytes()
    except OSError as exc:
        raise NetVLADInputError(f"cannot read the {what} file {path}: {exc.strerror}") from None
