"""Who may talk to the gRPC port: TLS or mutual TLS credentials and bearer-token authentication.

- `--tls-cert` and `--tls-key` (PEM) make the port speak TLS only; plaintext clients fail the
  handshake. `--tls-client-ca` also requires every client to present a certificate signed by that
  CA (mutual TLS).
- `--token-file` names a file of accepted bearer tokens, one per line (blank lines and lines
  starting with `#` are ignored). Every call must then carry `authorization: Bearer <token>`, or
  it ends UNAUTHENTICATED before its request is even parsed. The health service stays open, so
  load balancers and Kubernetes probes need no secret. Server reflection is NOT open: it is a
  debugging aid rather than a probe, and grpcurl passes the token with `-H`.

Tokens are kept only as SHA-256 digests and a presented token's digest is compared with
`hmac.compare_digest` against every accepted digest (no early exit), so the timing shows neither
its content, its length nor which token matched. Tokens are never logged.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import logging
import ssl
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc

from netvlad_server.config import ServerConfig

OPEN_METHOD_PREFIXES = ("/grpc.health.v1.Health/",)  # reachable without a token (probes)
MIN_TOKEN_LENGTH = 16
TOKEN_HINT = 'python3 -c "import secrets; print(secrets.token_urlsafe(32))"'
log = logging.getLogger(__name__)


class SecurityFileError(OSError):
    """A certificate, key or token file that is missing, unreadable or unusable (names the flag)."""


@dataclass(frozen=True)
class ChannelSecurity:
    """What the server needs to open its port: credentials (None = plaintext) and interceptors."""

    credentials: grpc.ServerCredentials | None
    interceptors: tuple[grpc.aio.ServerInterceptor, ...]
    summary: str  # one phrase for the startup log, e.g. "mutual TLS, 2 bearer tokens"
    warnings: tuple[str, ...]  # settings that defeat each other (logged as warnings)
    notes: tuple[str, ...]  # exposure worth knowing about (logged at info level)


def _read(path: str, flag: str) -> bytes:
    """A file's bytes, or SecurityFileError naming the flag."""
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise SecurityFileError(f"{flag} {path}: cannot read it: {exc.strerror}") from None


def server_credentials(config: ServerConfig) -> grpc.ServerCredentials | None:
    """TLS (or mutual TLS) credentials from the configured PEM files; None when TLS is off.

    The certificate and key are loaded into a Python ssl context first, so a malformed PEM or a
    key that does not belong to the certificate is reported here rather than as failed handshakes.
    """
    if not config.tls_cert:
        return None
    assert config.tls_key is not None  # config validation guarantees the pair
    certificate = _read(config.tls_cert, "--tls-cert")
    key = _read(config.tls_key, "--tls-key")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_cert_chain(config.tls_cert, config.tls_key)
    except ssl.SSLError as exc:
        raise SecurityFileError(
            f"--tls-cert {config.tls_cert} / --tls-key {config.tls_key}: not a PEM certificate "
            f"chain and its matching private key ({exc.reason or exc})") from None
    client_ca = None
    if config.tls_client_ca:
        client_ca = _read(config.tls_client_ca, "--tls-client-ca")
        try:
            context.load_verify_locations(cafile=config.tls_client_ca)
        except ssl.SSLError as exc:
            raise SecurityFileError(
                f"--tls-client-ca {config.tls_client_ca}: not a PEM CA certificate bundle "
                f"({exc.reason or exc})") from None
    return grpc.ssl_server_credentials(
        [(key, certificate)], root_certificates=client_ca,
        require_client_auth=client_ca is not None)


def token_digest(token: str | bytes) -> bytes:
    """The SHA-256 digest under which a token is kept and compared."""
    return hashlib.sha256(token.encode() if isinstance(token, str) else token).digest()


def load_token_digests(path: str) -> tuple[bytes, ...]:
    """Digests of the tokens in a token file (one per line; blank and # lines ignored)."""
    try:
        text = _read(path, "--token-file").decode("ascii")
    except UnicodeDecodeError:
        raise SecurityFileError(f"--token-file {path}: tokens must be ASCII text") from None
    digests = []
    for number, line in enumerate(text.splitlines(), start=1):
        token = line.strip()
        if not token or token.startswith("#"):
            continue
        if len(token) < MIN_TOKEN_LENGTH or not all("!" <= c <= "~" for c in token):
            raise SecurityFileError(
                f"--token-file {path}, line {number}: a token must be at least {MIN_TOKEN_LENGTH} "
                f"printable characters without spaces; make one with {TOKEN_HINT}")
        digests.append(token_digest(token))
    if not digests:
        raise SecurityFileError(f"--token-file {path} holds no token; put one per line, made "
                                f"with {TOKEN_HINT}")
    return tuple(dict.fromkeys(digests))


def token_accepted(token: str, digests: Sequence[bytes]) -> bool:
    """True when the token's digest equals one of `digests`; always compares against all."""
    candidate = token_digest(token)
    accepted = False
    for digest in digests:
        accepted |= hmac.compare_digest(candidate, digest)
    return accepted


def bearer_token(metadata: Sequence[tuple[str, str | bytes]] | None) -> str | None:
    """The token of the call's `authorization: Bearer <token>` metadata, or None."""
    for key, value in metadata or ():
        if key.lower() == "authorization" and isinstance(value, str):
            scheme, _, token = value.strip().partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                return token.strip()
    return None


def _refusal(handler: grpc.RpcMethodHandler | None, message: str) -> grpc.RpcMethodHandler:
    """A handler of the same response kind that ends the call UNAUTHENTICATED at once.

    It takes the request as a stream without deserializer, so nothing the caller sent is parsed.
    Unknown methods are refused the same way: without a token, nothing tells them apart.
    """
    if handler is not None and handler.response_streaming:
        async def refuse_stream(requests: AsyncIterator[bytes],
                                context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)
            yield b""  # never reached: makes this an async generator, as streaming needs

        return grpc.stream_stream_rpc_method_handler(refuse_stream)

    async def refuse(requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> bytes:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)
        return b""  # never reached: abort raises

    return grpc.stream_unary_rpc_method_handler(refuse)


class BearerTokenInterceptor(grpc.aio.ServerInterceptor):
    """Ends every call without an accepted bearer token UNAUTHENTICATED (open methods excepted)."""

    def __init__(self, digests: Sequence[bytes],
                 refused: Callable[[str], None] | None = None,
                 open_prefixes: Sequence[str] = OPEN_METHOD_PREFIXES) -> None:
        self._digests = tuple(digests)
        self._refused = refused
        self._open = tuple(open_prefixes)

    async def intercept_service(
        self, continuation: Callable[[grpc.HandlerCallDetails], object],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        """Pass accepted and open calls to their handler; refuse the others."""
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if method.startswith(self._open):
            return handler
        token = bearer_token(handler_call_details.invocation_metadata)
        if token is not None and token_accepted(token, self._digests):
            return handler
        reason = "missing" if token is None else "invalid"
        log.info("refused a call to %s: %s bearer token", method, reason)
        if self._refused is not None:
            self._refused(reason)
        if token is None:
            message = ("this server requires a bearer token: send the metadata "
                       "'authorization: Bearer <token>' (netvlad-client --token-file FILE)")
        else:
            message = "the bearer token is not accepted by this server"
        return _refusal(handler, message)


def _is_loopback(host: str) -> bool:
    """True for localhost and loopback addresses."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def load_security(config: ServerConfig,
                  refused: Callable[[str], None] | None = None) -> ChannelSecurity:
    """Read the TLS and token files named by config; `refused(reason)` counts refusals."""
    credentials = server_credentials(config)
    interceptors: tuple[grpc.aio.ServerInterceptor, ...] = ()
    parts = ["mutual TLS" if config.tls_client_ca else "TLS" if credentials else "plaintext"]
    if config.token_file:
        digests = load_token_digests(config.token_file)
        interceptors = (BearerTokenInterceptor(digests, refused),)
        parts.append(f"{len(digests)} bearer token(s) accepted (health open without one)")
    warnings, notes = [], []
    if credentials is None and not _is_loopback(config.host):
        notes.append(f"plaintext gRPC on {config.host}: anyone who can reach the port can call "
                     "it and read the traffic; use --tls-cert/--tls-key on untrusted networks")
    if credentials is None and config.token_file:
        warnings.append("bearer tokens over plaintext travel readable on the network; add "
                        "--tls-cert/--tls-key")
    if config.metrics_port and not _is_loopback(config.metrics_host):
        notes.append(f"/metrics is served without TLS or authentication on "
                     f"{config.metrics_host}; --metrics-host 127.0.0.1 keeps it on this host")
    return ChannelSecurity(credentials, interceptors, ", ".join(parts), tuple(warnings),
                           tuple(notes))
