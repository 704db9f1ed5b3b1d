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

Rotation needs no restart. The certificate, key and client CA are checked for a change (inode,
modification time, size) whenever a client connects, and the token file at most once a second
when a call arrives; changed files are read and checked again. New connections then get the new
certificate and calls are judged by the new tokens; connections already open keep theirs. A file
that fails its checks (half-written, a key of another certificate, no token left) is logged as an
error and the files read before stay in force, so a bad edit never opens the server nor locks
everyone out.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import logging
import os
import ssl
import time
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


Reloaded = Callable[[str, str], None]  # (file kind "tls" or "tokens", result "ok" or "error")
TOKEN_CHECK_INTERVAL = 1.0  # seconds between looks at the token file's stat


def _file_signature(path: str) -> tuple[int, int, int] | None:
    """(inode, mtime in ns, size) of the file a path leads to (symlinks followed); None if gone.

    A Kubernetes Secret volume swaps a symlink, an editor renames a new file into place, `cp`
    rewrites in place: each changes at least one of the three.
    """
    try:
        info = os.stat(path)
    except OSError:
        return None
    return info.st_ino, info.st_mtime_ns, info.st_size


class WatchedFiles:
    """A few paths and whether any of them changed since the last look."""

    def __init__(self, paths: Sequence[str]) -> None:
        self.paths = tuple(paths)
        self._signature = self._now()

    def _now(self) -> tuple[tuple[int, int, int] | None, ...]:
        return tuple(_file_signature(path) for path in self.paths)

    def changed(self) -> bool:
        """True (once) when a file was replaced, rewritten or removed since the last call."""
        now = self._now()
        if now == self._signature:
            return False
        self._signature = now
        return True


def _certificate_configuration(config: ServerConfig) -> grpc.ServerCertificateConfiguration:
    """The certificate, key and client CA read from config's PEM files and checked.

    The certificate and key are loaded into a Python ssl context first, so a malformed PEM or a
    key that does not belong to the certificate is reported here rather than as failed handshakes.
    """
    assert config.tls_cert is not None and config.tls_key is not None  # validated pair
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
    return grpc.ssl_server_certificate_configuration([(key, certificate)],
                                                     root_certificates=client_ca)


class CertificateReloader:
    """gRPC's certificate fetcher: called as each client connects, it answers a new
    configuration when the PEM files changed and passed their checks, else None (keep the old).
    """

    def __init__(self, config: ServerConfig, reloaded: Reloaded | None = None) -> None:
        self._config = config
        self._reloaded = reloaded
        paths = [config.tls_cert, config.tls_key, config.tls_client_ca]
        self._files = WatchedFiles([path for path in paths if path])
        self.initial = _certificate_configuration(config)  # a bad file stops the start here

    def __call__(self) -> grpc.ServerCertificateConfiguration | None:
        try:
            if not self._files.changed():
                return None
            configuration = _certificate_configuration(self._config)
        except SecurityFileError as exc:
            self._report("error", "%s; new connections keep the certificate read before", exc)
            return None
        except Exception:  # never let a fetcher error reach gRPC's handshake
            log.exception("re-reading the TLS files failed; keeping the certificate read before")
            self._report("error", None)
            return None
        self._report("ok", "TLS files changed: new connections get the certificate in %s",
                     self._config.tls_cert)
        return configuration

    def _report(self, result: str, message: str | None, *args: object) -> None:
        if message is not None:
            (log.info if result == "ok" else log.error)(message, *args)
        if self._reloaded is not None:
            self._reloaded("tls", result)


def server_credentials(config: ServerConfig,
                       reloaded: Reloaded | None = None) -> grpc.ServerCredentials | None:
    """TLS (or mutual TLS) credentials following changes to the PEM files; None without TLS."""
    if not config.tls_cert:
        return None
    fetcher = CertificateReloader(config, reloaded)
    return grpc.dynamic_ssl_server_credentials(
        fetcher.initial, fetcher, require_client_authentication=bool(config.tls_client_ca))


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


class TokenFile:
    """The accepted token digests of --token-file, re-read when the file changes."""

    def __init__(self, path: str, reloaded: Reloaded | None = None,
                 check_interval: float = TOKEN_CHECK_INTERVAL,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.path = path
        self._reloaded = reloaded
        self._interval = check_interval
        self._clock = clock
        self._files = WatchedFiles([path])
        self._digests = load_token_digests(path)  # a bad file stops the start here
        self._checked = clock()

    def digests(self) -> tuple[bytes, ...]:
        """The tokens in force, after a look at the file when check_interval has passed."""
        now = self._clock()
        if now - self._checked >= self._interval:
            self._checked = now
            self.refresh()
        return self._digests

    def refresh(self) -> bool:
        """Re-read the file if it changed; True when a new set of tokens took effect."""
        if not self._files.changed():
            return False
        try:
            digests = load_token_digests(self.path)
        except SecurityFileError as exc:
            log.error("%s; still accepting the %d token(s) read before", exc, len(self._digests))
            self._report("error")
            return False
        self._digests = digests
        log.info("--token-file %s changed: %d bearer token(s) accepted now", self.path,
                 len(digests))
        self._report("ok")
        return True

    def _report(self, result: str) -> None:
        if self._reloaded is not None:
            self._reloaded("tokens", result)


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

    def __init__(self, tokens: TokenFile, refused: Callable[[str], None] | None = None,
                 open_prefixes: Sequence[str] = OPEN_METHOD_PREFIXES) -> None:
        self._tokens = tokens
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
        if token is not None and token_accepted(token, self._tokens.digests()):
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


def load_security(config: ServerConfig, refused: Callable[[str], None] | None = None,
                  reloaded: Reloaded | None = None) -> ChannelSecurity:
    """Read the TLS and token files named by config; `refused(reason)` counts refusals and
    `reloaded(kind, result)` each later re-read of changed files."""
    credentials = server_credentials(config, reloaded)
    interceptors: tuple[grpc.aio.ServerInterceptor, ...] = ()
    parts = ["mutual TLS" if config.tls_client_ca else "TLS" if credentials else "plaintext"]
    if config.token_file:
        tokens = TokenFile(config.token_file, reloaded)
        interceptors = (BearerTokenInterceptor(tokens, refused),)
        parts.append(f"{len(tokens.digests())} bearer token(s) accepted (health open without "
                     "one)")
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
