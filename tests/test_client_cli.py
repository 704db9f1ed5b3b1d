"""`netvlad-client` against a real server subprocess: describe, formats, resume, info, health."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from client_support import ServerProcess, one_line_error, random_image, reference, write_png
from client_support import run_cli as run
from netvlad_client.bench.harness import free_port
from netvlad_client.cli import main

ATOL = 1e-6


@pytest.fixture(scope="module")
def server(tiny_server_process):
    return tiny_server_process


@pytest.fixture
def folder(tmp_path):
    """A folder of 9 PNGs (gray and RGB, two sizes) plus a non-image file; pixels by name."""
    directory = tmp_path / "seq"
    directory.mkdir()
    pixels = {}
    for i in range(9):
        image = random_image(100 + i, 32 + 8 * (i % 2), 48, channels=1 if i % 3 == 0 else 3)
        pixels[str(write_png(directory / f"{i:03d}.png", image))] = image
    (directory / "notes.txt").write_text("not an image")
    return directory, pixels


def test_describe_one_image_equals_the_network(server, tmp_path):
    image = random_image(1, 48, 64)
    path = write_png(tmp_path / "img.png", image)
    out = tmp_path / "d.npy"
    assert run(server, "describe", str(path), "--out", str(out)) == 0
    got = np.load(out)
    assert got.dtype == np.float32 and got.shape == (1, 32)
    np.testing.assert_array_equal(got[0], reference(image))


def test_server_on_the_official_directory_gives_what_the_network_computes(tmp_path):
    """netvlad-server --model <the folder the official zip unpacks to>; describe via the CLI."""
    from netvlad_server.network import NetVLADNetwork
    from netvlad_server.weights import demo_weights, load_weights
    from weightfiles import write_official_dir

    # Not demo-tiny's seed: only a server that really read the folder gives these descriptors.
    directory = write_official_dir(demo_weights("tiny", seed=3).tensors, tmp_path)
    image = random_image(7, 48, 64)
    path, out = write_png(tmp_path / "img.png", image), tmp_path / "d.npy"
    process = ServerProcess(free_port(), free_port(), tmp_path / "server.log",
                            "--model", str(directory))
    try:
        process.wait_serving()
        assert main(["--target", process.target, "describe", str(path), "--out", str(out)]) == 0
    finally:
        process.stop()
    got = np.load(out)
    np.testing.assert_array_equal(got, NetVLADNetwork(load_weights(directory))(image))
    assert not np.allclose(got[0], reference(image), atol=1e-3)


def test_every_output_format_reads_back(server, folder, tmp_path):
    directory, pixels = folder
    names = sorted(pixels)
    expected = np.stack([reference(pixels[name]) for name in names])
    outputs = {}
    for fmt in ("npy", "npz", "csv", "json", "bin"):
        out = tmp_path / f"d.{fmt}"
        # One image per model call, so that every run computes bit-identical rows.
        assert run(server, "describe", str(directory), "--out", str(out), "--batch-size", "1",
                   "--concurrency", "1") == 0
        outputs[fmt] = out
    npy = np.load(outputs["npy"])
    np.testing.assert_allclose(npy, expected, atol=ATOL, rtol=0)
    with np.load(outputs["npz"]) as data:
        np.testing.assert_array_equal(data["descriptors"], npy)
        assert data["names"].tolist() == names
    csv = np.loadtxt(outputs["csv"], delimiter=",", dtype=np.float32, ndmin=2)
    np.testing.assert_array_equal(csv, npy)  # 9 significant digits round-trip float32
    entries = json.loads(outputs["json"].read_text())
    assert [entry["name"] for entry in entries] == names
    np.testing.assert_array_equal(
        np.array([entry["descriptor"] for entry in entries], dtype=np.float32), npy
    )
    n, d = npy.shape
    raw = np.fromfile(outputs["bin"], dtype="<f4")
    assert raw.size == n * d
    np.testing.assert_array_equal(raw.reshape(n, d), npy)
    # MATLAB: fread(f, [D, N], 'float32') fills a D x N matrix column by column; ' transposes.
    np.testing.assert_array_equal(raw.reshape((d, n), order="F").T, npy)


def test_format_flag_overrides_the_extension(server, tmp_path, capsys):
    path = write_png(tmp_path / "a.png", random_image(2))
    out = tmp_path / "descriptors.dat"
    assert run(server, "describe", str(path), "--out", str(out), "--format", "bin") == 0
    np.testing.assert_allclose(np.fromfile(out, "<f4"), reference(random_image(2)),
                               atol=ATOL, rtol=0)
    assert "note:" not in capsys.readouterr().err  # .dat says nothing about the format
    misleading = tmp_path / "descriptors.npy"
    assert run(server, "describe", str(path), "--out", str(misleading), "--format", "csv") == 0
    assert f"note: writing csv (--format) into {misleading}, whose name says npy" in \
        capsys.readouterr().err
    assert np.loadtxt(misleading, delimiter=",").shape == (32,)


def test_without_out_json_goes_to_standard_output(server, folder, capsys):
    directory, pixels = folder
    names = sorted(pixels)
    # `netvlad-client describe IMG...`: no --out needed to look at descriptors.
    assert run(server, "describe", str(directory), "--batch-size", "1") == 0
    captured = capsys.readouterr()
    entries = json.loads(captured.out)
    assert [entry["name"] for entry in entries] == names
    got = np.array([entry["descriptor"] for entry in entries], dtype=np.float32)
    np.testing.assert_allclose(got, np.stack([reference(pixels[n]) for n in names]),
                               atol=ATOL, rtol=0)
    assert f"wrote 9 x {got.shape[1]} descriptors to standard output (json)" in captured.err
    assert run(server, "describe", names[0], "--out", "-", "--format", "csv") == 0
    row = np.loadtxt(capsys.readouterr().out.splitlines(), delimiter=",", dtype=np.float32)
    np.testing.assert_allclose(row, reference(pixels[names[0]]), atol=ATOL, rtol=0)


def test_binary_formats_on_standard_output_only_into_a_pipe(server, folder, tmp_path, capsys,
                                                           monkeypatch):
    directory, pixels = folder
    names = sorted(pixels)
    command = [sys.executable, "-m", "netvlad_client.cli", "--target", server.target,
               "describe", str(directory), "--format", "npy"]
    done = subprocess.run(command, capture_output=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr.decode()
    got = np.load(io.BytesIO(done.stdout))
    np.testing.assert_allclose(got, np.stack([reference(pixels[n]) for n in names]),
                               atol=ATOL, rtol=0)
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)
    assert run(server, "describe", names[0], "--format", "bin") == 1
    one_line_error(capsys, "binary .bin to a terminal", "--out FILE")


@pytest.mark.parametrize("fmt", ["json", "csv", "npy", "npz", "bin"])
def test_a_reader_that_stops_early_is_no_error(server, folder, fmt):
    directory, _ = folder
    command = [sys.executable, "-m", "netvlad_client.cli", "--target", server.target,
               "describe", str(directory), "--format", fmt]
    child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    child.stdout.close()  # like `| head -0`: gone before the first descriptor is written
    _, err = child.communicate(timeout=120)
    text = err.decode()
    assert child.returncode == 0, text
    assert "Traceback" not in text and "Broken pipe" not in text, text
    # Never "wrote ...": the reader did not get everything, and the message says so.
    assert text.strip().splitlines() == [
        f"netvlad-client: standard output was closed by its reader before all 9 x 32 "
        f"descriptors ({fmt}) were written"], text


def test_npy_into_a_pipe_its_reader_closes_midway_is_reported_not_raised(monkeypatch):
    # The reader takes the first bytes and goes (`| head -c 10`) while a large array is written.
    import threading
    import types

    from netvlad_client.cli import describe

    read_end, write_end = os.pipe()

    def reader() -> None:
        os.read(read_end, 10)
        os.close(read_end)

    thread = threading.Thread(target=reader)
    with open(write_end, "wb") as writer:  # its fd ends on /dev/null, where the close is quiet
        monkeypatch.setattr(sys, "stdout", types.SimpleNamespace(buffer=writer,
                                                                 fileno=writer.fileno))
        thread.start()
        try:
            rows = np.ones((256, 1024), np.float32)
            assert describe.write_stdout("npy", rows, ["x"] * 256) is False
        finally:
            thread.join(10)


def test_concurrency_is_lowered_to_what_the_servers_queue_holds(tiny_model, folder, tmp_path,
                                                                capsys):
    from server_thread import ServerThread, tiny_config

    directory, pixels = folder
    config = tiny_config(free_port(), max_queue_size=8, max_images_per_request=8,
                         max_batch_size=1, max_queue_delay_ms=0.0)
    out = tmp_path / "d.npy"
    with ServerThread(config, lambda _config: tiny_model) as running:
        assert main(["--target", running.target, "--retries", "0", "describe", str(directory),
                     "--out", str(out), "--batch-size", "4", "--concurrency", "4"]) == 0
    assert ("note: 4 requests of 4 images would overfill the server's bulk queue of 8; sending 2 "
            "at a time") in capsys.readouterr().err
    np.testing.assert_allclose(np.load(out), np.stack([reference(pixels[n])
                                                       for n in sorted(pixels)]), atol=1e-5)


def test_resume_needs_an_output_file(server, folder, capsys):
    directory, _ = folder
    assert run(server, "describe", str(directory), "--resume") == 1
    one_line_error(capsys, "--resume", "--out FILE")


def test_dims_and_resize_options(server, tmp_path, capsys):
    image = random_image(3, 32, 64)
    path = write_png(tmp_path / "a.png", image)
    out = tmp_path / "d.npy"
    assert run(server, "describe", str(path), "--out", str(out), "--dims", "8") == 0
    got = np.load(out)
    assert got.shape == (1, 8)
    np.testing.assert_allclose(got[0], reference(image, dims=8), atol=ATOL, rtol=0)
    assert run(server, "describe", str(path), "--out", str(out), "--resize", "fit:32") == 0
    import cv2

    halved = cv2.resize(image, (32, 16), interpolation=cv2.INTER_AREA)  # the server's policy
    np.testing.assert_allclose(np.load(out)[0], reference(halved), atol=ATOL, rtol=0)
    with pytest.raises(SystemExit):
        run(server, "describe", str(path), "--out", str(out), "--resize", "half")
    assert "fit:N" in capsys.readouterr().err


def test_concurrency_keeps_input_order(server, folder, tmp_path):
    _, pixels = folder
    files = sorted(pixels, reverse=True)  # explicit order, not the folder's
    out = tmp_path / "d.npz"
    code = run(server, "describe", *files, "--out", str(out), "--batch-size", "1",
               "--concurrency", "4")
    assert code == 0
    with np.load(out) as data:
        assert data["names"].tolist() == files
        np.testing.assert_allclose(data["descriptors"],
                                   np.stack([reference(pixels[f]) for f in files]),
                                   atol=ATOL, rtol=0)


def test_input_errors_are_one_line(server, folder, tmp_path, capsys):
    directory, pixels = folder
    image = next(iter(pixels))
    empty = tmp_path / "empty"
    empty.mkdir()
    out = str(tmp_path / "d.npy")
    assert run(server, "describe", str(tmp_path / "nope.png"), image, "--out", out) == 1
    one_line_error(capsys, "not found", "nope.png")
    assert run(server, "describe", str(directory / "notes.txt"), "--out", out) == 1
    one_line_error(capsys, "not an image file", "notes.txt")
    assert run(server, "describe", str(empty), "--out", out) == 1
    one_line_error(capsys, "no image files in directory", str(empty))
    assert run(server, "describe", image, "--out", str(tmp_path / "d.xyz")) == 1
    one_line_error(capsys, "cannot tell the output format", ".xyz", "--format")
    assert run(server, "describe", image, "--out", str(tmp_path / "no" / "d.npy")) == 1
    one_line_error(capsys, "does not exist")
    assert run(server, "describe", image, "--out", out, "--dims", "64") == 1
    one_line_error(capsys, "--dims 64", "32")
    assert not Path(out).exists()


def test_server_refusal_is_one_line_with_the_file(server, folder, tmp_path, capsys):
    directory, _ = folder
    (directory / "100.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    assert run(server, "describe", str(directory), "--out", str(tmp_path / "d.npy")) == 1
    one_line_error(capsys, "INVALID_ARGUMENT", str(directory / "100.png"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["seq"]  # no output, no temporary file


def test_rows_go_to_a_file_not_to_memory_and_nothing_is_left_behind(server, folder, tmp_path):
    directory, pixels = folder
    names = sorted(pixels)
    expected = np.stack([reference(pixels[name]) for name in names])
    outputs = tmp_path / "outputs"
    outputs.mkdir()
    for fmt in ("npy", "bin", "csv", "npz"):
        out = outputs / f"d.{fmt}"
        assert run(server, "describe", str(directory), "--out", str(out), "--batch-size", "2",
                   "--concurrency", "3") == 0
    # Formats without names get the list of images in row order beside them; nothing else.
    assert sorted(p.name for p in outputs.iterdir()) == [
        "d.bin", "d.bin.paths.txt", "d.csv", "d.csv.paths.txt", "d.npy", "d.npy.paths.txt",
        "d.npz"]
    assert (outputs / "d.csv.paths.txt").read_text().splitlines() == names
    np.testing.assert_allclose(np.load(outputs / "d.npy"), expected, atol=ATOL, rtol=0)
    np.testing.assert_allclose(np.fromfile(outputs / "d.bin", "<f4").reshape(expected.shape),
                               expected, atol=ATOL, rtol=0)
    # A file named twice gets its row twice (the rows are then gathered, not written in place).
    twice = outputs / "twice.npy"
    assert run(server, "describe", names[1], names[0], names[1], "--out", str(twice)) == 0
    np.testing.assert_allclose(np.load(twice), expected[[1, 0, 1]], atol=ATOL, rtol=0)


def test_row_file_fills_the_output_in_place_in_any_order(tmp_path):
    from netvlad_client.rowstore import RowFile

    values = np.arange(12, dtype=np.float32).reshape(4, 3)
    names = ["a", "b", "c", "d"]
    for fmt in ("npy", "bin"):
        out = tmp_path / f"rows.{fmt}"
        rows = RowFile(names, 3, output=out, fmt=fmt)
        assert rows.in_place and rows.path.name == f".rows.{fmt}.tmp-{os.getpid()}"
        assert isinstance(rows.rows, np.memmap)  # on disk, not in RAM
        rows.put(["d", "b"], values[[3, 1]])
        rows.put(["a", "c"], values[[0, 2]])
        assert rows.count() == 4 and not out.exists()
        rows.finish(out)
        rows.discard()  # after finish: leaves the output alone
        got = np.load(out) if fmt == "npy" else np.fromfile(out, "<f4").reshape(4, 3)
        np.testing.assert_array_equal(got, values)
    scratch = RowFile(names, 3, scratch_dir=tmp_path)
    assert not scratch.in_place and scratch.path.parent == tmp_path
    scratch.put(names, values)
    scratch.discard()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rows.bin", "rows.npy"]
    empty = RowFile([], 3, output=tmp_path / "empty.npy", fmt="npy")
    empty.finish(tmp_path / "empty.npy")
    assert np.load(tmp_path / "empty.npy").shape == (0, 3)


def test_connection_option_errors_are_one_line(server, tmp_path, capsys):
    assert run(server, "--token-file", str(tmp_path / "none"), "info") == 1
    one_line_error(capsys, "cannot read the token file")
    (tmp_path / "empty-token").write_text("\n\n")
    assert run(server, "--token-file", str(tmp_path / "empty-token"), "info") == 1
    one_line_error(capsys, "is empty")
    assert run(server, "--tls-ca", str(tmp_path / "ca.pem"), "info") == 1
    one_line_error(capsys, "cannot read the TLS root CA file")
    assert run(server, "--tls-cert", str(tmp_path / "c.pem"), "info") == 1
    one_line_error(capsys, "both a client certificate and its private key")
    assert main(["--target", "host-a:1,host-b:2", "info"]) == 1
    one_line_error(capsys, "dns:///")


def test_recursive_folders(server, folder, tmp_path):
    directory, pixels = folder
    nested = directory / "deeper"
    nested.mkdir()
    extra = random_image(99)
    write_png(nested / "x.png", extra)
    out = tmp_path / "d.npz"
    assert run(server, "describe", str(directory), "--out", str(out)) == 0
    assert len(np.load(out)["names"]) == len(pixels)
    assert run(server, "describe", str(directory), "-r", "--out", str(out)) == 0
    with np.load(out) as data:
        assert data["names"].tolist() == sorted([*pixels, str(nested / "x.png")])


def test_unreachable_server_is_one_line(tmp_path, capsys):
    path = write_png(tmp_path / "a.png", random_image(4))
    code = main(["--target", f"127.0.0.1:{free_port()}", "--retries", "0", "describe",
                 str(path), "--out", str(tmp_path / "d.npy")])
    assert code == 1
    one_line_error(capsys, "unavailable")


def test_target_from_the_environment(server, tmp_path, monkeypatch):
    monkeypatch.setenv("NETVLAD_TARGET", server.target)
    path = write_png(tmp_path / "a.png", random_image(5))
    assert main(["describe", str(path), "--out", str(tmp_path / "d.npy")]) == 0


def test_a_bad_environment_value_is_blamed_on_the_variable(server, monkeypatch, capsys):
    monkeypatch.setenv("NETVLAD_CLIENT_TIMEOUT", "abc")
    monkeypatch.setenv("NETVLAD_CLIENT_RETRIES", "2")
    with pytest.raises(SystemExit) as caught:
        run(server, "info")
    assert caught.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]  # after argparse's usage lines
    assert error == ("netvlad-client: error: environment variable NETVLAD_CLIENT_TIMEOUT='abc': "
                     "expected a number > 0, got 'abc'")
    assert run(server, "--timeout", "30", "info") == 0  # a flag overrides the variable
    monkeypatch.setenv("NETVLAD_CLIENT_TIMEOUT", "12.5")
    from netvlad_client.cli import build_parser
    from netvlad_client.options import parse_args

    args = parse_args(build_parser(), ["info"])
    assert (args.timeout, args.retries) == (12.5, 2)


def test_progress_bar(server, folder, tmp_path, capsys):
    directory, pixels = folder
    out = str(tmp_path / "d.npy")
    assert run(server, "describe", str(directory), "--out", out, "--batch-size", "2",
               "--progress", "always") == 0
    assert f"{len(pixels)}/{len(pixels)} images" in capsys.readouterr().err
    assert run(server, "describe", str(directory), "--out", out, "--batch-size", "2") == 0
    assert "images/s" not in capsys.readouterr().err  # auto: stderr is not a terminal here


def test_resume_after_a_failure_redoes_nothing(server, folder, tmp_path, capsys):
    directory, pixels = folder
    names = sorted(pixels)
    clean = tmp_path / "clean.npy"
    assert run(server, "describe", str(directory), "--out", str(clean)) == 0
    capsys.readouterr()
    # A corrupt file in the middle stops the run; the chunks before it are saved (and one that
    # was already in flight may be too).
    bad = Path(names[5])
    good_bytes = bad.read_bytes()
    bad.write_bytes(good_bytes[:50])
    out = tmp_path / "d.npy"
    partial = tmp_path / "d.npy.partial"
    args = ["describe", str(directory), "--out", str(out), "--batch-size", "2",
            "--concurrency", "1", "--resume"]
    assert run(server, *args) == 1
    chunks = sorted(partial.glob("chunk-*.npz"))
    saved = [name for chunk in chunks for name in np.load(chunk)["names"].tolist()]
    assert saved == names[:4]  # one request in flight: none starts after the failure
    one_line_error(capsys, "INVALID_ARGUMENT", str(bad), f"{len(saved)} of 9 images are saved")
    assert not out.exists()
    # Mark a saved row: if the second run recomputed it, the mark would be gone.
    with np.load(chunks[0]) as data:
        marked = data["descriptors"].copy()
    marked[0] = -marked[0]
    np.savez(chunks[0], names=np.array(names[:2]), descriptors=marked)
    bad.write_bytes(good_bytes)
    before = server.metric("netvlad_images_total")
    assert run(server, *args) == 0
    assert server.metric("netvlad_images_total") - before == 9 - len(saved)
    assert f"resuming: {len(saved)} of 9 images" in capsys.readouterr().err
    assert not partial.exists()
    got, expected = np.load(out), np.load(clean)
    np.testing.assert_array_equal(got[0], -expected[0])
    np.testing.assert_allclose(got[1:], expected[1:], atol=ATOL, rtol=0)


def test_resume_refuses_a_checkpoint_of_other_options(server, folder, tmp_path, capsys):
    directory, _ = folder
    (directory / "004.png").write_bytes(b"broken")
    out = str(tmp_path / "d.npy")
    assert run(server, "describe", str(directory), "--out", out, "--resume",
               "--batch-size", "2", "--concurrency", "1") == 1
    capsys.readouterr()
    assert run(server, "describe", str(directory), "--out", out, "--resume", "--dims", "8") == 1
    one_line_error(capsys, "holds descriptors made with", "dims 32 (now 8)")


def test_ctrl_c_keeps_finished_chunks_and_a_rerun_finishes(server, tmp_path):
    directory = tmp_path / "many"
    directory.mkdir()
    pixels = {str(write_png(directory / f"{i:04d}.png", random_image(500 + i, 24, 24))):
              random_image(500 + i, 24, 24) for i in range(150)}
    out = tmp_path / "d.npy"
    partial = tmp_path / "d.npy.partial"
    command = [sys.executable, "-m", "netvlad_client.cli", "--target", server.target,
               "describe", str(directory), "--out", str(out), "--resume", "--batch-size", "1",
               "--concurrency", "1"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, env=env)
    try:
        deadline = time.monotonic() + 120
        while len(list(partial.glob("chunk-*.npz"))) < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
        server.pause()  # the next request hangs, like a server that went away
        time.sleep(0.5)
        assert process.poll() is None, "the run finished before it could be interrupted"
        done = len(list(partial.glob("chunk-*.npz")))
        process.send_signal(signal.SIGINT)
        _, err = process.communicate(timeout=30)
    finally:
        server.resume()
        process.kill()
    assert process.returncode == 130
    assert "Traceback" not in err
    assert f"interrupted; {done} of 150 images are saved in {partial}" in err
    assert not out.exists()
    # The request cancelled by the interrupt may still finish now that the server runs again.
    before = server.metric("netvlad_images_total", quiet=0.5)
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr
    assert f"resuming: {done} of 150 images" in result.stderr
    assert server.metric("netvlad_images_total") - before == 150 - done
    expected = np.stack([reference(pixels[name]) for name in sorted(pixels)])
    np.testing.assert_allclose(np.load(out), expected, atol=ATOL, rtol=0)


def test_info_human_and_json(server, capsys):
    assert run(server, "info") == 0
    text = capsys.readouterr().out
    assert "DEMO WEIGHTS" in text and "output dims" in text and "32" in text
    assert run(server, "info", "--json") == 0
    info = json.loads(capsys.readouterr().out)
    assert info["output_dims"] == 32
    assert info["batching"]["max_images_per_request"] == 4


def test_health_exit_status(server, capsys):
    assert run(server, "health") == 0
    assert capsys.readouterr().out.strip() == "SERVING"
    closed = f"127.0.0.1:{free_port()}"
    assert main(["--target", closed, "health"]) == 1
    assert capsys.readouterr().out.startswith("UNREACHABLE")
    assert main(["--target", closed, "health", "--wait", "1"]) == 1
    assert capsys.readouterr().out.startswith("UNREACHABLE")
    assert run(server, "health", "--wait", "30") == 0
    assert capsys.readouterr().out.strip() == "SERVING"
    assert run(server, "health", "--service", "no.such.Service") == 1
    assert capsys.readouterr().out.strip() == "SERVICE_UNKNOWN"
    assert run(server, "health", "--service", "netvlad.v1.DescriptorService") == 0


def test_tls_false_in_the_environment_means_plaintext(server, monkeypatch, capsys):
    # NETVLAD_CLIENT_TLS=false once turned TLS on, and the plaintext server was unreachable.
    monkeypatch.setenv("NETVLAD_CLIENT_TLS", "false")
    assert run(server, "--retries", "0", "info") == 0
    monkeypatch.setenv("NETVLAD_CLIENT_TLS", "true")
    assert run(server, "--retries", "0", "--timeout", "5", "info") == 1  # TLS to a plaintext port
    one_line_error(capsys)
    monkeypatch.setenv("NETVLAD_CLIENT_TLS", "sure")
    with pytest.raises(SystemExit) as caught:
        run(server, "info")
    assert caught.value.code == 2
    assert "environment variable NETVLAD_CLIENT_TLS='sure': expected a boolean" in \
        capsys.readouterr().err
