"""`netvlad-models fetch` against a real HTTP server on 127.0.0.1 serving a zip built here."""

from __future__ import annotations

import hashlib
import http.server
import io
import re
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from netvlad_client.bench.harness import free_port
from netvlad_server.fetch import OFFICIAL_NAME, FetchConfig, FetchError, fetch
from netvlad_server.weights import load_weights
from weightfiles import write_official_zip


class FileServer:
    """A threaded HTTP server on loopback serving one payload, honouring Range unless told not to.

    ``range_mode``: "honour" (206 + Content-Range), "ignore" (always 200, whole file) or "wrong"
    (206 whose Content-Range starts at 0 whatever was asked). ``drop_after``: on the first
    request only, send that many body bytes and then close the connection.
    """

    def __init__(self, payload: bytes, range_mode: str = "honour", drop_after: int | None = None):
        self.payload, self.range_mode, self.drop_after = payload, range_mode, drop_after
        self.ranges: list[str | None] = []
        owner = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                owner.serve(self)

            def log_message(self, *args: object) -> None:
                """Keep the test output quiet."""

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/{OFFICIAL_NAME}.zip"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def serve(self, handler: http.server.BaseHTTPRequestHandler) -> None:
        """Answer one GET according to the configured behaviour."""
        asked = handler.headers.get("Range")
        self.ranges.append(asked)
        if handler.path != f"/{OFFICIAL_NAME}.zip":
            handler.send_error(404)
            return
        size, start = len(self.payload), 0
        match = re.fullmatch(r"bytes=(\d+)-", asked or "")
        if match and self.range_mode != "ignore":
            start = int(match.group(1)) if self.range_mode == "honour" else 0
            if start >= size:
                handler.send_response(416)
                handler.send_header("Content-Range", f"bytes */{size}")
                handler.send_header("Content-Length", "0")
                handler.end_headers()
                return
            handler.send_response(206)
            handler.send_header("Content-Range", f"bytes {start}-{size - 1}/{size}")
        else:
            handler.send_response(200)
        body = self.payload[start:]
        handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        if self.drop_after is not None and len(self.ranges) == 1:
            handler.wfile.write(body[: self.drop_after])
            handler.wfile.flush()
            handler.connection.shutdown(socket.SHUT_RDWR)
            handler.close_connection = True
            return
        handler.wfile.write(body)

    def close(self) -> None:
        """Stop serving and free the port."""
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join()


@pytest.fixture(scope="module")
def official_zip(tmp_path_factory: pytest.TempPathFactory, tiny_weights) -> bytes:
    """The bytes of an official-style zip holding the tiny weights as a TF1 checkpoint."""
    path = tmp_path_factory.mktemp("zip") / f"{OFFICIAL_NAME}.zip"
    write_official_zip(tiny_weights.tensors, path)
    return path.read_bytes()


@pytest.fixture
def serve() -> Iterator:
    """Start FileServers on demand; all are stopped after the test."""
    servers: list[FileServer] = []

    def start(payload: bytes, **kwargs: object) -> FileServer:
        servers.append(FileServer(payload, **kwargs))
        return servers[-1]

    yield start
    for server in servers:
        server.close()


def assert_installed(dest: Path, tiny_weights) -> None:
    """The model directory holds exactly the served weights and nothing else was left behind."""
    loaded = load_weights(dest / OFFICIAL_NAME)
    assert set(loaded.tensors) == set(tiny_weights.tensors)
    for name, value in tiny_weights.tensors.items():
        np.testing.assert_array_equal(loaded.tensors[name], value, err_msg=name)
    assert sorted(p.name for p in dest.iterdir()) == [OFFICIAL_NAME]


def assert_nothing_installed(dest: Path, keep_part: bool = False) -> None:
    """No model directory and no staging folder in dest; the .part only where it should stay."""
    left = sorted(p.name for p in dest.iterdir()) if dest.exists() else []
    assert left == ([f"{OFFICIAL_NAME}.zip.part"] if keep_part else [])


def test_full_download_installs_verified_model(tmp_path, serve, official_zip, tiny_weights):
    server = serve(official_zip)
    log = io.StringIO()
    target = fetch(FetchConfig(dest=tmp_path / "models", url=server.url), log)
    assert target == tmp_path / "models" / OFFICIAL_NAME
    assert_installed(tmp_path / "models", tiny_weights)
    assert server.ranges == [None]
    assert "100.0%" in log.getvalue()
    assert f"verified {len(tiny_weights.tensors)} tensors" in log.getvalue()


def test_interrupted_download_is_kept_and_resumed_with_range(
    tmp_path, serve, official_zip, tiny_weights
):
    cut = len(official_zip) // 3
    server = serve(official_zip, drop_after=cut)
    cfg = FetchConfig(dest=tmp_path, url=server.url, retries=0)
    with pytest.raises(FetchError, match=r"interrupted .* kept at .*\.zip\.part.* again to resume"):
        fetch(cfg, io.StringIO())
    assert cfg.part.read_bytes() == official_zip[:cut]
    assert_nothing_installed(tmp_path, keep_part=True)

    fetch(cfg, io.StringIO())
    assert server.ranges == [None, f"bytes={cut}-"]
    assert_installed(tmp_path, tiny_weights)


def test_interruption_is_resumed_within_one_run(tmp_path, serve, official_zip, tiny_weights):
    cut = len(official_zip) // 2
    server = serve(official_zip, drop_after=cut)
    log = io.StringIO()
    fetch(FetchConfig(dest=tmp_path, url=server.url, retries=1), log)
    assert server.ranges == [None, f"bytes={cut}-"]
    assert "resuming (1/1)" in log.getvalue()
    assert_installed(tmp_path, tiny_weights)


@pytest.mark.parametrize("range_mode", ["ignore", "wrong"])
def test_server_not_honouring_range_restarts_from_scratch(
    tmp_path, serve, official_zip, tiny_weights, range_mode
):
    cut = len(official_zip) // 2
    server = serve(official_zip, range_mode=range_mode, drop_after=cut)
    cfg = FetchConfig(dest=tmp_path, url=server.url, retries=0)
    with pytest.raises(FetchError, match="interrupted"):
        fetch(cfg, io.StringIO())
    # Make the kept prefix differ from the real file: appending to it would corrupt the result.
    cfg.part.write_bytes(b"\0" * cut)
    log = io.StringIO()
    fetch(cfg, log)
    if range_mode == "ignore":
        assert server.ranges == [None, f"bytes={cut}-"]
        assert "ignored the Range header" in log.getvalue()
    else:
        assert server.ranges == [None, f"bytes={cut}-", None]
        assert f"Content-Range 'bytes 0-{len(official_zip) - 1}" in log.getvalue()
        assert "starting again from byte 0" in log.getvalue()
    assert_installed(tmp_path, tiny_weights)


def test_complete_part_file_is_not_downloaded_again(tmp_path, serve, official_zip, tiny_weights):
    server = serve(official_zip)
    cfg = FetchConfig(dest=tmp_path, url=server.url)
    cfg.part.write_bytes(official_zip)
    fetch(cfg, io.StringIO())
    assert server.ranges == [f"bytes={len(official_zip)}-"]
    assert_installed(tmp_path, tiny_weights)


def _flip_middle_byte(data: bytes) -> bytes:
    """The same bytes with one in the middle inverted (a CRC error inside a stored member)."""
    middle = len(data) // 2
    return data[:middle] + bytes([data[middle] ^ 0xFF]) + data[middle + 1 :]


@pytest.mark.parametrize(
    ("mangle", "message"),
    [
        (_flip_middle_byte, r"damaged zip|not a valid zip"),
        (lambda data: b"<html>mirror moved</html>", r"not a valid zip"),
        (lambda data: data[: len(data) // 2], r"not a valid zip"),
    ],
    ids=["flipped-byte", "not-a-zip", "truncated"],
)
def test_corrupt_zip_is_rejected_and_nothing_left(tmp_path, serve, official_zip, mangle, message):
    server = serve(mangle(official_zip))
    with pytest.raises(FetchError, match=message) as caught:
        fetch(FetchConfig(dest=tmp_path, url=server.url), io.StringIO())
    assert "nothing was installed" in str(caught.value)
    assert_nothing_installed(tmp_path)


def test_zip_without_all_tensors_is_rejected(tmp_path, serve, tiny_weights):
    tensors = {k: v for k, v in tiny_weights.tensors.items() if k != "WPCA/bias"}
    path = tmp_path / "incomplete.zip"
    write_official_zip(tensors, path)
    server = serve(path.read_bytes())
    dest = tmp_path / "models"
    problem = r"(?s)does not hold valid NetVLAD weights: .*missing tensors: WPCA/bias"
    with pytest.raises(FetchError, match=problem):
        fetch(FetchConfig(dest=dest, url=server.url), io.StringIO())
    assert_nothing_installed(dest)


def test_sha256_is_checked(tmp_path, serve, official_zip, tiny_weights):
    server = serve(official_zip)
    with pytest.raises(FetchError, match="SHA-256 mismatch"):
        fetch(FetchConfig(dest=tmp_path, url=server.url, sha256="0" * 64), io.StringIO())
    assert_nothing_installed(tmp_path)
    good = hashlib.sha256(official_zip).hexdigest().upper()
    fetch(FetchConfig(dest=tmp_path, url=server.url, sha256=good), io.StringIO())
    assert_installed(tmp_path, tiny_weights)


@pytest.mark.parametrize("partial", [False, True], ids=["fresh", "with-partial-download"])
def test_no_network_gives_clear_message(tmp_path, partial):
    port = free_port()
    url = f"http://127.0.0.1:{port}/{OFFICIAL_NAME}.zip"
    cfg = FetchConfig(dest=tmp_path, url=url, timeout=5)
    if partial:
        cfg.part.write_bytes(b"PK\3\4 first bytes")
    with pytest.raises(FetchError) as caught:
        fetch(cfg, io.StringIO())
    message = str(caught.value)
    assert message.startswith(f"cannot reach 127.0.0.1:{port} (")
    assert f"download it by hand from {url}" in message
    assert f"`netvlad-models inspect {tmp_path / OFFICIAL_NAME}`" in message
    assert (f"partial download is kept at {cfg.part}" in message) == partial
    assert_nothing_installed(tmp_path, keep_part=partial)


def test_http_error_is_reported(tmp_path, serve, official_zip):
    server = serve(official_zip)
    url = server.url.replace(OFFICIAL_NAME, "moved")
    with pytest.raises(FetchError, match=r"answered HTTP 404 Not Found; check the URL"):
        fetch(FetchConfig(dest=tmp_path, url=url), io.StringIO())
    assert_nothing_installed(tmp_path)


def test_existing_model_is_refused_without_force(tmp_path, serve, official_zip, tiny_weights):
    server = serve(official_zip)
    existing = tmp_path / OFFICIAL_NAME
    existing.mkdir()
    (existing / "mine.txt").write_text("keep me")
    with pytest.raises(FetchError, match=r"already exists.*--force"):
        fetch(FetchConfig(dest=tmp_path, url=server.url), io.StringIO())
    assert server.ranges == []
    assert (existing / "mine.txt").read_text() == "keep me"

    fetch(FetchConfig(dest=tmp_path, url=server.url, force=True), io.StringIO())
    assert not (existing / "mine.txt").exists()
    assert_installed(tmp_path, tiny_weights)


def test_cli_fetch_command(tmp_path, serve, official_zip):
    server = serve(official_zip)
    dest = tmp_path / "models"
    command = [str(Path(sys.executable).with_name("netvlad-models")), "fetch", "--dest", str(dest)]
    done = subprocess.run([*command, "--url", server.url], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert (dest / OFFICIAL_NAME).is_dir()
    assert f"installed {dest / OFFICIAL_NAME}" in done.stderr
    complete = [line for line in done.stderr.splitlines() if "100.0%" in line]
    assert len(complete) == 1, done.stderr  # not a terminal: each state is written once

    again = subprocess.run([*command, "--url", server.url], capture_output=True, text=True)
    assert again.returncode == 1
    assert "already exists" in again.stderr


def test_cli_refuses_a_malformed_sha256_before_downloading(tmp_path, serve, official_zip):
    server = serve(official_zip)
    command = [str(Path(sys.executable).with_name("netvlad-models")), "fetch", "--dest",
               str(tmp_path), "--url", server.url, "--sha256", "00"]
    done = subprocess.run(command, capture_output=True, text=True)
    assert done.returncode == 2
    assert "--sha256: expected 64 hexadecimal digits (a SHA-256), got '00'" in done.stderr
    assert server.ranges == []
