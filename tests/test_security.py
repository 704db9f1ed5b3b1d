"""TLS, mutual TLS and bearer tokens on real servers (127.0.0.1) with certificates made here."""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import subprocess
import sys
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import pytest
from client_support import ServerProcess, random_image, reference, write_png
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from netvlad_client import (
    NetVLADClient,
    NetVLADInputError,
    NetVLADRPCError,
    NetVLADUnavailableError,
)
from netvlad_client._proto import netvlad_pb2 as pb
from netvlad_client._proto import netvlad_pb2_grpc as pb_grpc
from netvlad_client.bench.harness import free_port
from netvlad_client.cli import main as client_main
from netvlad_server.config import ConfigError, build_parser, config_from_values
from netvlad_server.main import main as server_main
from netvlad_server.security import (
    SecurityFileError,
    bearer_token,
    load_security,
    load_token_digests,
    token_accepted,
    token_digest,
)
from pki import PKI, make_pki
from server_thread import ServerThread, tiny_config, wait_for

TOKENS = ("robot-7-3f9c2a5d8e1b4c07", "slam-backend-b2e8d1f4a6c9e370")
WRONG_TOKEN = "robot-7-3f9c2a5d8e1b4c08"  # one character off the first
TIMEOUT = 30.0
UNAUTHENTICATED = grpc.StatusCode.UNAUTHENTICATED


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> PKI:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def token_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("tokens") / "tokens.txt"
    path.write_text(f"# robots\n{TOKENS[0]}\n\n  {TOKENS[1]}  \n")
    return path


@pytest.fixture(scope="module")
def tls_server(pki, token_file, tiny_model):
    """TLS (no client certificates) and bearer tokens."""
    config = tiny_config(free_port(), tls_cert=str(pki.server.cert_path),
                         tls_key=str(pki.server.key_path), token_file=str(token_file))
    with ServerThread(config, lambda _config: tiny_model) as running:
        yield running


@pytest.fixture(scope="module")
def mtls_server(pki, token_file, tiny_model):
    """Mutual TLS (client certificates signed by pki.ca) and bearer tokens."""
    config = tiny_config(free_port(), tls_cert=str(pki.server.cert_path),
                         tls_key=str(pki.server.key_path), tls_client_ca=str(pki.ca.cert_path),
                         token_file=str(token_file))
    with ServerThread(config, lambda _config: tiny_model) as running:
        yield running


def tls_client(running, pki: PKI, *, client_cert: bool = False, **options) -> NetVLADClient:
    """A NetVLADClient trusting pki.ca (and presenting pki.client when client_cert)."""
    if client_cert:
        options.update(client_certificate=pki.client.cert_path,
                       client_key=pki.client.key_path)
    options.setdefault("root_certificates", pki.ca.cert_path)
    return NetVLADClient(running.target, retries=0, timeout=TIMEOUT, **options)


def refused_handshake(client: NetVLADClient) -> NetVLADUnavailableError:
    """The error of a call whose TLS handshake fails (gRPC reports UNAVAILABLE)."""
    with client, pytest.raises(NetVLADUnavailableError) as caught:
        client.health()
    return caught.value


def auth_failures(running, reason: str) -> float:
    """netvlad_auth_failures_total{reason} from the server's /metrics page."""
    found = re.search(rf'^netvlad_auth_failures_total{{reason="{reason}"}} (\S+)$',
                      running.metrics_text(), flags=re.M)
    return float(found[1]) if found else 0.0


def test_tls_client_with_the_token_gets_the_networks_descriptors(tls_server, pki):
    image = random_image(1)
    with tls_client(tls_server, pki, token=TOKENS[1]) as client:
        assert client.config.tls
        np.testing.assert_allclose(client.describe(image)[0], reference(image), atol=1e-6)
        assert client.info().output_dims == 32


def test_plaintext_client_is_refused_by_a_tls_server(tls_server, pki):
    with grpc.insecure_channel(tls_server.target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        with pytest.raises(grpc.RpcError) as caught:
            health.Check(health_pb2.HealthCheckRequest(), timeout=TIMEOUT)
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    refused_handshake(NetVLADClient(tls_server.target, retries=0, token=TOKENS[0]))
    with tls_client(tls_server, pki) as client:  # the server is unharmed
        assert client.health() == "SERVING"


def test_wrong_ca_and_wrong_server_name_are_refused(tls_server, pki):
    refused_handshake(tls_client(tls_server, pki, root_certificates=pki.other_ca.cert_path))
    refused_handshake(tls_client(tls_server, pki, root_certificates=None, tls=True))  # system CAs
    refused_handshake(tls_client(tls_server, pki, server_name="not-this-server.example"))
    with tls_client(tls_server, pki, server_name="localhost") as client:
        assert client.health() == "SERVING"


def test_localhost_name_matches_the_certificate(tls_server, pki):
    target = f"localhost:{tls_server.server.port}"
    with NetVLADClient(target, root_certificates=pki.ca.cert_path, token=TOKENS[0], retries=0,
                       timeout=TIMEOUT) as client:
        assert client.describe(random_image(2)).shape == (1, 32)


@pytest.mark.parametrize("token", [None, WRONG_TOKEN, TOKENS[0][:-1], TOKENS[0] + "x"])
def test_missing_or_wrong_token_is_unauthenticated_for_every_method(tls_server, pki, token):
    reason = "missing" if token is None else "invalid"
    before = auth_failures(tls_server, reason)
    with tls_client(tls_server, pki, token=token) as client:
        for call in (lambda: client.describe(random_image(3)), client.info,
                     lambda: list(client.describe_stream([random_image(4)]))):
            with pytest.raises(NetVLADRPCError) as caught:
                call()
            assert caught.value.code == UNAUTHENTICATED
            expected = "requires a bearer token" if token is None else "not accepted"
            assert expected in caught.value.details
        assert client.health() == "SERVING"  # probes need no token
    assert auth_failures(tls_server, reason) == before + 3


def test_every_listed_token_passes_and_the_scheme_is_required(tls_server, pki):
    for token in TOKENS:
        with tls_client(tls_server, pki, token=token) as client:
            assert client.describe(random_image(5)).shape == (1, 32)
    credentials = grpc.ssl_channel_credentials(pki.ca.cert_path.read_bytes())
    with grpc.secure_channel(tls_server.target, credentials) as channel:
        stub = pb_grpc.DescriptorServiceStub(channel)
        info = stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=TIMEOUT,
                                 metadata=(("authorization", f"bearer   {TOKENS[0]}"),))
        assert info.output_dims == 32
        with pytest.raises(grpc.RpcError) as caught:  # a token without "Bearer " is no token
            stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=TIMEOUT,
                              metadata=(("authorization", TOKENS[0]),))
        assert caught.value.code() == UNAUTHENTICATED


def _reflection_services(channel: grpc.Channel, metadata=()) -> set[str]:
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    request = reflection_pb2.ServerReflectionRequest(list_services="")
    answers = stub.ServerReflectionInfo(iter([request]), timeout=TIMEOUT, metadata=metadata)
    return {service.name for answer in answers
            for service in answer.list_services_response.service}


def test_health_is_open_and_reflection_and_unknown_methods_need_the_token(tls_server, pki):
    credentials = grpc.ssl_channel_credentials(pki.ca.cert_path.read_bytes())
    with grpc.secure_channel(tls_server.target, credentials) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        status = health.Check(health_pb2.HealthCheckRequest(service="netvlad.v1.DescriptorService"),
                              timeout=TIMEOUT).status
        assert status == health_pb2.HealthCheckResponse.SERVING
        with pytest.raises(grpc.RpcError) as caught:
            _reflection_services(channel)
        assert caught.value.code() == UNAUTHENTICATED
        names = _reflection_services(channel, (("authorization", f"Bearer {TOKENS[0]}"),))
        unknown = channel.unary_unary("/netvlad.v1.DescriptorService/NoSuchMethod")
        for metadata, code in (((), UNAUTHENTICATED), ((("authorization", f"Bearer {TOKENS[1]}"),),
                                                      grpc.StatusCode.UNIMPLEMENTED)):
            with pytest.raises(grpc.RpcError) as caught:
                unknown(b"", timeout=TIMEOUT, metadata=metadata)
            assert caught.value.code() == code  # strangers cannot probe for method names
    assert "netvlad.v1.DescriptorService" in names


def test_mutual_tls_refuses_a_missing_or_foreign_client_certificate(mtls_server, pki):
    refused_handshake(tls_client(mtls_server, pki, token=TOKENS[0]))
    refused_handshake(tls_client(mtls_server, pki, token=TOKENS[0],
                                 client_certificate=pki.other_client.cert_path,
                                 client_key=pki.other_client.key_path))
    image = random_image(6)
    with tls_client(mtls_server, pki, client_cert=True, token=TOKENS[0]) as client:
        np.testing.assert_allclose(client.describe(image)[0], reference(image), atol=1e-6)
    with tls_client(mtls_server, pki, client_cert=True) as client, \
            pytest.raises(NetVLADRPCError) as caught:  # a certificate does not replace the token
        client.info()
    assert caught.value.code == UNAUTHENTICATED


@pytest.fixture(scope="module")
def plain_server(tiny_model):
    """No TLS at all."""
    with ServerThread(tiny_config(free_port()), lambda _config: tiny_model) as running:
        yield running


def test_a_tls_mismatch_says_what_is_likely_wrong(tls_server, mtls_server, plain_server, pki):
    def hint(running, **options) -> str:
        error = refused_handshake(tls_client(running, pki, **options))
        assert error.hint and str(error).endswith(f". Likely cause: {error.hint}")
        return error.hint

    # gRPC itself says only "Socket closed" when the server hangs up during the handshake.
    plaintext = NetVLADClient(tls_server.target, retries=0, timeout=TIMEOUT)
    error = refused_handshake(plaintext)
    assert "Socket closed" in error.details
    assert "may require TLS" in error.hint and "--tls-ca FILE" in error.hint
    assert "not signed by a CA this client trusts" in hint(
        tls_server, root_certificates=pki.other_ca.cert_path)
    assert "--tls-ca FILE" in hint(tls_server, root_certificates=pki.other_ca.cert_path)
    assert "--tls-server-name NAME" in hint(tls_server, server_name="not-this-server.example")
    no_certificate = hint(mtls_server)
    assert "client certificate (mutual TLS)" in no_certificate
    assert "--tls-cert FILE and --tls-key FILE" in no_certificate
    assert "its --tls-client-ca" in hint(mtls_server,
                                         client_certificate=pki.other_client.cert_path,
                                         client_key=pki.other_client.key_path)
    assert "does not speak TLS" in hint(plain_server)
    # Waiting for SERVING ends with the same advice; an absent server gets no guess.
    with NetVLADClient(tls_server.target, retries=0) as client, \
            pytest.raises(NetVLADUnavailableError) as caught:
        client.wait_until_serving(timeout=1.0)
    assert "not SERVING after 1 s" in str(caught.value) and "--tls-ca FILE" in caught.value.hint
    with NetVLADClient(f"127.0.0.1:{free_port()}", retries=0) as client, \
            pytest.raises(NetVLADUnavailableError) as caught:
        client.info()
    assert caught.value.hint == "" and "Likely cause" not in str(caught.value)


def _client_stderr(running, pki: PKI, *flags: str, program: str = "netvlad-client",
                   **environ: str) -> list[str]:
    """stderr lines of the CLI (a separate process) trusting the wrong CA for `running`."""
    env = {key: value for key, value in os.environ.items() if key != "GRPC_VERBOSITY"}
    env.update(environ)
    command = ([str(Path(sys.executable).parent / program)] if program
               else [sys.executable, "-m", "netvlad_client.cli"])
    result = subprocess.run(
        [*command, *flags, "--target", running.target, "--retries", "0", "--tls-ca",
         str(pki.other_ca.cert_path), "info"],
        capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode == 1 and result.stdout == ""
    return result.stderr.splitlines()


def test_the_cli_keeps_grpc_core_logs_off_stderr_unless_asked(tls_server, pki):
    for quiet in (_client_stderr(tls_server, pki), _client_stderr(tls_server, pki, program="")):
        assert len(quiet) == 1, quiet  # only the CLI's own line, with its advice
        assert quiet[0].startswith("netvlad-client: error: server at ")
        assert "Likely cause: the server's certificate is not signed by a CA" in quiet[0]
    # Asked for, gRPC's own handshake line comes back (--verbose, or GRPC_VERBOSITY set).
    for loud in (_client_stderr(tls_server, pki, "--verbose"),
                 _client_stderr(tls_server, pki, GRPC_VERBOSITY="INFO")):
        assert any("Handshake failed" in line and "CERTIFICATE_VERIFY_FAILED" in line
                   for line in loud), loud
        assert loud[-1] == quiet[0]
    # The library leaves gRPC's logging to the program that uses it.
    env = {key: value for key, value in os.environ.items() if key != "GRPC_VERBOSITY"}
    code = "import os, netvlad_client; print(os.environ.get('GRPC_VERBOSITY'))"
    shown = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           timeout=120, env=env, check=True)
    assert shown.stdout.strip() == "None"


def test_cli_with_ca_client_certificate_and_token_file(mtls_server, pki, token_file, tmp_path,
                                                       capsys):
    images = [write_png(tmp_path / f"{i}.png", random_image(10 + i)) for i in range(3)]
    secure = ["--target", f"localhost:{mtls_server.server.port}", "--tls-ca",
              str(pki.ca.cert_path), "--tls-cert", str(pki.client.cert_path), "--tls-key",
              str(pki.client.key_path), "--retries", "0"]
    out = tmp_path / "d.npy"
    assert client_main([*secure, "--token-file", str(token_file), "describe",
                        *map(str, images), "--out", str(out)]) == 0
    expected = np.stack([reference(random_image(10 + i)) for i in range(3)])
    np.testing.assert_allclose(np.load(out), expected, atol=1e-6)
    assert client_main([*secure, "health"]) == 0  # health needs the certificate, not the token
    assert capsys.readouterr().out.strip().endswith("SERVING")
    assert client_main([*secure, "info"]) == 1
    err = capsys.readouterr().err.strip()
    assert "UNAUTHENTICATED" in err and len(err.splitlines()) == 1
    no_cert = [*secure[:4], "--retries", "0", "--token-file", str(token_file)]
    assert client_main([*no_cert, "info"]) == 1
    assert "unavailable" in capsys.readouterr().err


def test_metrics_host_127_0_0_1_keeps_metrics_on_this_host(tiny_model):
    def reachable(running, host: str) -> bool:
        url = f"http://{host}:{running.config.metrics_port}/metrics"
        try:
            with urllib.request.urlopen(url, timeout=5) as page:
                return b"netvlad_queue_depth" in page.read()
        except OSError:
            return False

    # 127.0.0.2 is this machine too, but a socket bound to 127.0.0.1 does not answer it.
    local = tiny_config(free_port(), metrics_host="127.0.0.1")
    with ServerThread(local, lambda _config: tiny_model, load=False) as running:
        assert reachable(running, "127.0.0.1") and not reachable(running, "127.0.0.2")
    everywhere = dataclasses.replace(local, metrics_host="0.0.0.0", metrics_port=free_port())
    with ServerThread(everywhere, lambda _config: tiny_model, load=False) as running:
        assert reachable(running, "127.0.0.2")


def test_token_never_appears_in_the_server_log(pki, token_file, tmp_path):
    log = tmp_path / "server.log"
    server = ServerProcess(free_port(), free_port(), log, "--log-level", "DEBUG",
                           "--tls-cert", str(pki.server.cert_path), "--tls-key",
                           str(pki.server.key_path), "--tls-client-ca", str(pki.ca.cert_path),
                           "--token-file", str(token_file))
    try:
        def client(token):
            return NetVLADClient(server.target, root_certificates=pki.ca.cert_path,
                                 client_certificate=pki.client.cert_path,
                                 client_key=pki.client.key_path, token=token, retries=0,
                                 timeout=TIMEOUT)

        def serving() -> bool:
            assert server.process.poll() is None, server.tail()
            try:
                with client(None) as probe:
                    return probe.health(timeout=2) == "SERVING"
            except NetVLADUnavailableError:
                return False

        wait_for(serving, timeout=180, what="the TLS server to be SERVING")
        for token in TOKENS:
            with client(token) as good:
                assert good.describe(random_image(7)).shape == (1, 32)
                assert len(list(good.describe_stream([random_image(8)]))) == 1
        for token in (WRONG_TOKEN, None):
            with client(token) as bad, pytest.raises(NetVLADRPCError):
                bad.info()
    finally:
        server.stop()
    assert server.process.returncode == 0, server.tail()
    text = log.read_text(errors="replace")
    assert "mutual TLS, 2 bearer token(s) accepted" in text
    assert "refused a call to /netvlad.v1.DescriptorService/GetModelInfo: invalid" in text
    for secret in (*TOKENS, WRONG_TOKEN, TOKENS[0][:12]):
        assert secret not in text


def test_security_flags_and_environment(tmp_path):
    env = {"NETVLAD_TLS_CERT": "s.pem", "NETVLAD_TLS_KEY": "s.key", "NETVLAD_TLS_CLIENT_CA": "ca",
           "NETVLAD_TOKEN_FILE": "t.txt"}
    config = config_from_values({}, env)
    assert (config.tls_cert, config.tls_key, config.tls_client_ca, config.token_file) == (
        "s.pem", "s.key", "ca", "t.txt")
    assert config_from_values({"tls_cert": "flag.pem"}, env).tls_cert == "flag.pem"
    assert config_from_values({}, {"NETVLAD_TLS_CERT": ""}).tls_cert is None
    with pytest.raises(ConfigError, match="--tls-cert and --tls-key go together"):
        config_from_values({"tls_cert": "a.pem"}, {})
    with pytest.raises(ConfigError, match=r"--tls-client-ca .* needs --tls-cert"):
        config_from_values({"tls_client_ca": "ca.pem"}, {})
    help_text = build_parser().format_help()
    for env_name in env:
        assert env_name in help_text


def test_unusable_files_are_refused_at_startup_naming_the_flag(pki, tmp_path):
    def load(**files):
        return load_security(tiny_config(0, **files))

    pair = {"tls_cert": str(pki.server.cert_path), "tls_key": str(pki.server.key_path)}
    with pytest.raises(SecurityFileError, match=r"--tls-cert .*missing\.pem: cannot read it"):
        load(tls_cert=str(tmp_path / "missing.pem"), tls_key=pair["tls_key"])
    with pytest.raises(SecurityFileError, match="matching private key"):
        load(tls_cert=pair["tls_cert"], tls_key=str(pki.client.key_path))
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate\n")
    with pytest.raises(SecurityFileError, match=r"--tls-client-ca .*not a PEM CA"):
        load(**pair, tls_client_ca=str(garbage))
    empty = tmp_path / "empty.txt"
    empty.write_text("# nothing yet\n\n")
    with pytest.raises(SecurityFileError, match="holds no token"):
        load(token_file=str(empty))
    weak = tmp_path / "weak.txt"
    weak.write_text(f"{TOKENS[0]}\nshort-secret\n")
    with pytest.raises(SecurityFileError, match="line 2: a token must be at least 16") as caught:
        load(token_file=str(weak))
    assert "short-secret" not in str(caught.value)
    security = load(**pair, tls_client_ca=str(pki.ca.cert_path))
    assert security.credentials is not None and security.summary == "mutual TLS"
    assert not security.interceptors


def test_server_main_exits_1_on_a_key_that_does_not_match(pki, caplog):
    args = ["--model", "demo-tiny", "--host", "127.0.0.1", "--port", "0", "--metrics-port", "0",
            "--tls-cert", str(pki.server.cert_path), "--tls-key", str(pki.client.key_path)]
    with caplog.at_level(logging.ERROR):
        assert server_main(args) == 1
    assert "not a PEM certificate chain and its matching private key" in caplog.text


def test_token_comparison_and_parsing():
    digests = load_token_digests_from(TOKENS)
    assert all(token_accepted(token, digests) for token in TOKENS)
    for wrong in (WRONG_TOKEN, "", TOKENS[0][:-1], TOKENS[0] + TOKENS[1], "ü" * 20):
        assert not token_accepted(wrong, digests)
    assert bearer_token((("Authorization", "Bearer abc"),)) == "abc"
    assert bearer_token((("authorization", "Basic abc"),)) is None
    assert bearer_token((("authorization", "Bearer "),)) is None
    assert bearer_token((("x-other", "Bearer abc"),)) is None
    assert bearer_token(None) is None


def load_token_digests_from(tokens) -> tuple[bytes, ...]:
    """Digests as load_token_digests keeps them."""
    return tuple(token_digest(token) for token in tokens)


def test_token_file_keeps_digests_only(token_file):
    digests = load_token_digests(str(token_file))
    assert digests == load_token_digests_from(TOKENS)
    assert all(token.encode() not in digest for digest in digests for token in TOKENS)


def test_a_token_is_compared_with_every_accepted_digest(monkeypatch):
    import hmac

    compared = []
    real = hmac.compare_digest

    def counting(a, b):
        compared.append(len(b))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", counting)
    digests = load_token_digests_from((*TOKENS, "third-token-0123456789"))
    assert token_accepted(TOKENS[0], digests)  # matches the first: no early exit all the same
    assert not token_accepted("x", digests)
    assert compared == [32] * 6  # fixed-length digests, never the raw tokens


def test_client_refuses_a_token_grpc_cannot_carry():
    with pytest.raises(NetVLADInputError, match="printable ASCII"):
        NetVLADClient("127.0.0.1:1", token="tök-ü-1234567890123")


def security_reloads(running, kind: str, result: str) -> float:
    """netvlad_security_reloads_total{file, result} from the server's /metrics page."""
    found = re.search(rf'^netvlad_security_reloads_total{{file="{kind}",result="{result}"}} (\S+)$',
                      running.metrics_text(), flags=re.M)
    return float(found[1]) if found else 0.0


def replace_file(path, content: bytes) -> None:
    """Put new content at path the way editors and Secret volumes do: a new file renamed in."""
    fresh = path.with_name(path.name + ".new")
    fresh.write_bytes(content)
    fresh.replace(path)


def test_a_rotated_token_file_takes_effect_without_a_restart(tiny_model, tmp_path, caplog):
    tokens = tmp_path / "tokens.txt"
    tokens.write_text(f"{TOKENS[0]}\n")
    config = tiny_config(free_port(), token_file=str(tokens))

    def accepted(running, token: str) -> bool:
        with NetVLADClient(running.target, token=token, retries=0, timeout=TIMEOUT) as client:
            try:
                client.info()
                return True
            except NetVLADRPCError as exc:
                assert exc.code == UNAUTHENTICATED, exc
                return False

    with ServerThread(config, lambda _config: tiny_model) as running, \
            caplog.at_level(logging.INFO, logger="netvlad_server"):
        assert accepted(running, TOKENS[0]) and not accepted(running, TOKENS[1])
        replace_file(tokens, f"# rotated\n{TOKENS[1]}\n".encode())
        wait_for(lambda: accepted(running, TOKENS[1]), timeout=20, what="the new token")
        assert not accepted(running, TOKENS[0])  # the old one is gone with the old file
        assert security_reloads(running, "tokens", "ok") == 1
        # A bad edit keeps the tokens read before rather than opening or locking the server.
        replace_file(tokens, b"too-short\n")
        wait_for(lambda: accepted(running, TOKENS[1])
                 and security_reloads(running, "tokens", "error") == 1,
                 timeout=20, what="the bad token file to be noticed")
        tokens.unlink()
        wait_for(lambda: accepted(running, TOKENS[1])
                 and security_reloads(running, "tokens", "error") == 2,
                 timeout=20, what="the missing token file to be noticed")
        assert not accepted(running, TOKENS[0])
    assert "1 bearer token(s) accepted now" in caplog.text
    assert "line 1: a token must be at least 16" in caplog.text
    assert "still accepting the 1 token(s) read before" in caplog.text
    for secret in (*TOKENS, "too-short"):
        assert secret not in caplog.text


def test_a_renewed_certificate_reaches_new_connections_without_a_restart(pki, tiny_model,
                                                                          tmp_path, caplog):
    from pki import issue

    cert, key = tmp_path / "server.pem", tmp_path / "server.key"
    replace_file(cert, pki.server.cert_path.read_bytes())
    replace_file(key, pki.server.key_path.read_bytes())
    config = tiny_config(free_port(), tls_cert=str(cert), tls_key=str(key))

    def serving(ca) -> bool:
        client = NetVLADClient(running.target, root_certificates=ca, retries=0, timeout=TIMEOUT)
        with client:
            try:
                return client.health(timeout=5) == "SERVING"
            except NetVLADUnavailableError:
                return False

    with ServerThread(config, lambda _config: tiny_model) as running, \
            caplog.at_level(logging.INFO, logger="netvlad_server"):
        assert serving(pki.ca.cert_path) and not serving(pki.other_ca.cert_path)
        (tmp_path / "renewed").mkdir()
        renewed = issue(pki.other_ca, tmp_path / "renewed", "server", "netvlad-server",
                        ("localhost",), ("127.0.0.1",))
        # Certificate first, key second: a client may connect between the two renames.
        replace_file(cert, renewed.cert_path.read_bytes())
        replace_file(key, renewed.key_path.read_bytes())
        wait_for(lambda: serving(pki.other_ca.cert_path), timeout=20,
                 what="new connections to get the renewed certificate")
        assert not serving(pki.ca.cert_path)
        assert security_reloads(running, "tls", "ok") >= 1
        # A key that does not belong to the certificate: logged, the renewed pair stays in use.
        replace_file(key, pki.client.key_path.read_bytes())
        errors = security_reloads(running, "tls", "error")
        wait_for(lambda: serving(pki.other_ca.cert_path)
                 and security_reloads(running, "tls", "error") > errors,
                 timeout=20, what="the mismatched key to be noticed")
        assert serving(pki.other_ca.cert_path)
    assert "new connections get the certificate in" in caplog.text
    assert "new connections keep the certificate read before" in caplog.text


def test_the_token_file_is_looked_at_no_more_than_once_per_interval(tmp_path):
    from netvlad_server.security import TokenFile

    path = tmp_path / "tokens.txt"
    path.write_text(f"{TOKENS[0]}\n")
    now = [100.0]
    seen: list[tuple[str, str]] = []
    tokens = TokenFile(str(path), lambda kind, result: seen.append((kind, result)),
                       check_interval=1.0, clock=lambda: now[0])
    replace_file(path, f"{TOKENS[1]}\n".encode())
    now[0] = 100.9
    assert tokens.digests() == (token_digest(TOKENS[0]),)  # too soon to look
    now[0] = 101.0
    assert tokens.digests() == (token_digest(TOKENS[1]),)
    now[0] = 105.0
    assert tokens.digests() == (token_digest(TOKENS[1]),) and seen == [("tokens", "ok")]
    assert not tokens.refresh()  # unchanged: not read again
