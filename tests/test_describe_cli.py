"""`netvlad-client describe` under the conditions of real use: bad images among good ones
(--on-error), outputs that cannot be written, killed and interrupted runs, readers that go away,
folder scans. A real server subprocess (demo-tiny) throughout."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from client_support import one_line_error, random_image, reference, write_png
from client_support import run_cli as run

ATOL = 1e-6
ENV = {**os.environ, "PYTHONUNBUFFERED": "1"}


@pytest.fixture(scope="module")
def server(tiny_server_process):
    return tiny_server_process


def cli(server, *args: str) -> list[str]:
    """The command line of netvlad-client --target SERVER ARGS in a child process."""
    return [sys.executable, "-m", "netvlad_client.cli", "--target", server.target, *args]


def images(directory: Path, count: int, seed: int = 0, size: int = 24) -> dict[str, np.ndarray]:
    """`count` PNGs 0000.png... in `directory`; pixels by path."""
    directory.mkdir(exist_ok=True)
    found = {}
    for i in range(count):
        pixels = random_image(seed + i, size, size)
        found[str(write_png(directory / f"{i:04d}.png", pixels))] = pixels
    return found


def dead_pid() -> int:
    """The id of a process that has ended."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def wait_for_chunks(partial: Path, count: int, process: subprocess.Popen) -> None:
    """Wait until the checkpoint holds `count` chunk files (the run still going)."""
    deadline = time.monotonic() + 120
    while len(list(partial.glob("chunk-*.npz"))) < count:
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "the run saved no chunks"
        time.sleep(0.01)


# ----------------------------------------------------------------------------- output paths


def test_out_naming_a_directory_is_refused_before_any_work(server, tmp_path, capsys):
    pixels = images(tmp_path / "imgs", 3)
    before = server.metric("netvlad_images_total")
    adir = tmp_path / "adir"
    adir.mkdir()
    npz_dir = tmp_path / "d.npz"
    npz_dir.mkdir()
    for out, extra in ((adir, ()), (adir, ("--format", "csv")), (npz_dir, ())):
        assert run(server, "describe", str(tmp_path / "imgs"), "--out", str(out), *extra) == 1
        one_line_error(capsys, f"--out {out} is a directory", "name a file")
    a_file = write_png(tmp_path / "file.png", next(iter(pixels.values())))
    assert run(server, "describe", str(a_file), "--out", str(a_file / "x.npy")) == 1
    err = one_line_error(capsys, f"{a_file} is a file, not a directory")
    assert "does not exist" not in err
    assert server.metric("netvlad_images_total") == before  # refused before any request
    assert sorted(p.name for p in adir.iterdir()) == [] == sorted(npz_dir.iterdir())


def test_formats_without_names_get_the_paths_of_their_rows_beside_them(server, tmp_path):
    pixels = images(tmp_path / "imgs", 3)
    files = sorted(pixels, reverse=True)
    for fmt, sidecar in (("npy", True), ("csv", True), ("bin", True), ("npz", False),
                         ("json", False)):
        out = tmp_path / f"d.{fmt}"
        assert run(server, "describe", *files, "--out", str(out)) == 0
        paths = tmp_path / f"d.{fmt}.paths.txt"
        assert paths.exists() == sidecar
        if sidecar:
            assert paths.read_text().splitlines() == files


# ---------------------------------------------------------------------- bad images: --on-error


def bad_folder(tmp_path: Path) -> tuple[Path, dict[str, np.ndarray], dict[str, int]]:
    """14 images, 5 of them unusable (at positions 1, 2, 6, 10, 13): the good pixels by path,
    and each bad path's position."""
    directory = tmp_path / "mixed"
    pixels = images(directory, 14, seed=40)
    bad = {}
    for position, content in ((1, b""), (2, b"not an image at all"), (6, b"\x89PNG\r\n\x1a\n"),
                              (10, b"\xff\xd8\xff\xe0 truncated jpeg"), (13, b"P5\n4 4\n255\n")):
        path = directory / f"{position:04d}.png"
        path.write_bytes(content)
        del pixels[str(path)]
        bad[str(path)] = position
    return directory, pixels, bad


def test_skip_mode_keeps_every_good_image_and_lists_the_bad_ones(server, tmp_path, capsys):
    directory, pixels, bad = bad_folder(tmp_path)
    out = tmp_path / "it.npy"
    # Four images per request: every request but the last holds a bad image next to good ones.
    assert run(server, "describe", str(directory), "--out", str(out), "--on-error", "skip",
               "--batch-size", "4", "--concurrency", "2") == 0
    err = capsys.readouterr().err
    good = sorted(pixels)
    got = np.load(out)
    np.testing.assert_allclose(got, np.stack([reference(pixels[p]) for p in good]), atol=ATOL,
                               rtol=0)
    assert (tmp_path / "it.npy.paths.txt").read_text().splitlines() == good
    with open(tmp_path / "it.npy.skipped.tsv", newline="") as handle:
        table = list(csv.DictReader(handle, delimiter="\t"))
    assert [(row["path"], int(row["position"])) for row in table] == sorted(
        bad.items(), key=lambda item: item[1])
    assert all(row["reason"].startswith("INVALID_ARGUMENT: ") for row in table)
    assert "empty" in table[0]["reason"]
    for path, position in bad.items():
        assert f"note: skipped {path} (input #{position}): INVALID_ARGUMENT" in err
    assert "image 0 (" not in err and "image 1 (" not in err  # never a place inside a request
    assert (f"wrote 9 x 32 descriptors to {out} (npy); skipped 5 of 14 images, listed in "
            f"{out}.skipped.tsv") in err
    assert not list(tmp_path.glob(".*"))  # no temporary file left


def test_skip_mode_on_standard_output(server, tmp_path, capsys):
    directory, pixels, _ = bad_folder(tmp_path)
    expected = np.stack([reference(pixels[p]) for p in sorted(pixels)])
    for fmt in ("csv", "json"):
        assert run(server, "describe", str(directory), "--format", fmt, "--on-error", "skip",
                   "--batch-size", "3") == 0
        captured = capsys.readouterr()
        if fmt == "csv":
            got = np.loadtxt(captured.out.splitlines(), delimiter=",", dtype=np.float32)
        else:
            entries = json.loads(captured.out)
            assert [entry["name"] for entry in entries] == sorted(pixels)
            got = np.array([entry["descriptor"] for entry in entries], np.float32)
        np.testing.assert_allclose(got, expected, atol=ATOL, rtol=0)
        assert (f"wrote 9 x 32 descriptors to standard output ({fmt}); skipped 5 of 14 images"
                in captured.err)


def test_fail_mode_names_the_path_and_the_input_position(server, tmp_path, capsys):
    directory, _, bad = bad_folder(tmp_path)
    out = tmp_path / "it.npy"
    assert run(server, "describe", str(directory), "--out", str(out), "--batch-size", "4",
               "--concurrency", "1") == 1
    err = one_line_error(capsys, "INVALID_ARGUMENT", "--on-error skip", "fix or remove")
    first = min(bad, key=bad.get)
    assert f"refused {first} (input #1): " in err
    assert "image 1 (id" not in err and "--resume" not in err  # a rerun alone cannot help
    assert not out.exists() and not (tmp_path / "it.npy.skipped.tsv").exists()


def test_skip_mode_skips_a_file_the_client_cannot_read(server, tmp_path):
    from netvlad_client import NetVLADClient
    from netvlad_client.cli.bulk import BulkSettings, describe_rows
    from netvlad_client.rowstore import RowFile

    pixels = images(tmp_path / "imgs", 3)
    names = sorted(pixels)
    gone = str(tmp_path / "imgs" / "gone.png")  # deleted after the folder was listed
    names.insert(1, gone)
    with NetVLADClient(server.target) as client:
        info = client.info()
        rows = RowFile(names, info.output_dims)
        stream = open(tmp_path / "messages.txt", "w+")  # noqa: SIM115
        settings = BulkSettings(batch_size=4, on_error="skip")
        assert describe_rows(client, info, rows, settings, stream=stream) is None
        strict = RowFile(names, info.output_dims)
        assert describe_rows(client, info, strict, BulkSettings(on_error="fail"),
                             stream=stream) == 1
    stream.seek(0)
    text = stream.read()
    assert rows.skipped == {gone: f"image file not found: {gone}"}
    assert rows.count() == 3 and rows.kept() == [0, 2, 3]
    np.testing.assert_allclose(rows.rows[rows.kept()],
                               np.stack([reference(pixels[n]) for n in names if n != gone]),
                               atol=ATOL, rtol=0)
    assert f"note: skipped {gone} (input #1): image file not found" in text
    assert f"refused {gone} (input #1): image file not found" in text
    rows.discard()
    strict.discard()


def test_resume_remembers_what_was_skipped(server, tmp_path):
    directory = tmp_path / "many"
    pixels = images(directory, 40, seed=300)
    for bad in ("0000.png", "0001.png"):
        (directory / bad).write_bytes(b"broken")
        del pixels[str(directory / bad)]
    out, partial = tmp_path / "d.npy", tmp_path / "d.npy.partial"
    command = cli(server, "describe", str(directory), "--out", str(out), "--resume",
                  "--on-error", "skip", "--batch-size", "1", "--concurrency", "1")
    process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, env=ENV)
    try:
        wait_for_chunks(partial, 3, process)
        server.pause()
        time.sleep(0.3)
        done = len(list(partial.glob("chunk-*.npz")))
        assert len(list(partial.glob("skipped-*.json"))) == 2
        process.send_signal(signal.SIGINT)
        _, err = process.communicate(timeout=30)
    finally:
        server.resume()
        process.kill()
    assert process.returncode == 130, err
    before = server.metric("netvlad_images_total", quiet=0.5)
    refused_before = server.metric("netvlad_image_errors_total")
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=ENV)
    assert result.returncode == 0, result.stderr
    assert f"resuming: {done} of 40 images already described (2 skipped before)" in \
        result.stderr
    assert server.metric("netvlad_images_total") - before == 38 - done
    assert server.metric("netvlad_image_errors_total") == refused_before  # not sent again
    np.testing.assert_allclose(np.load(out), np.stack([reference(pixels[p])
                                                       for p in sorted(pixels)]), atol=ATOL)
    assert len((tmp_path / "d.npy.skipped.tsv").read_text().splitlines()) == 3


# ----------------------------------------------------------------- advice that fits the error


def test_errors_advise_what_helps(server, tmp_path, capsys):
    path = write_png(tmp_path / "a.png", random_image(9))
    folder = tmp_path / "imgs"
    images(folder, 6)
    out = str(tmp_path / "d.npy")
    # Refused by the server for an option: no rerun can fix it, so no advice to rerun.
    assert run(server, "describe", str(path), "--out", out, "--resize", "fit:10") == 1
    err = one_line_error(capsys, "INVALID_ARGUMENT", "longest_side 10")
    assert "--resume" not in err and "run the same command" not in err
    # A server that stops answering in time: raise --timeout; the finished work is kept.
    command = cli(server, "--timeout", "3", "--retries", "0", "describe", str(folder), "--out",
                  out, "--batch-size", "1", "--concurrency", "1", "--resume")
    process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, env=ENV)
    try:
        wait_for_chunks(Path(out + ".partial"), 1, process)
        server.pause()
        _, err = process.communicate(timeout=60)
    finally:
        server.resume()
        process.kill()
    assert process.returncode == 1 and len(err.strip().splitlines()) == 1, err
    for words in ("DEADLINE_EXCEEDED", "raise --timeout", "--timeout 3 s",
                  "run the same command again to finish"):
        assert words in err, err


# ----------------------------------------------------------- killed, interrupted, cut short


def test_a_killed_run_leaves_nothing_the_next_run_keeps(server, tmp_path, capsys):
    directory = tmp_path / "many"
    images(directory, 60, seed=600)
    out, partial = tmp_path / "k.npy", tmp_path / "k.npy.partial"
    command = cli(server, "describe", str(directory), "--out", str(out), "--resume",
                  "--batch-size", "1", "--concurrency", "1")
    process = subprocess.Popen(command, stderr=subprocess.DEVNULL, env=ENV)
    try:
        wait_for_chunks(partial, 3, process)
        process.kill()  # kill -9: nothing of ours runs
        process.wait(30)
    finally:
        process.kill()
    temporary = tmp_path / f".k.npy.tmp-{process.pid}"
    assert temporary.exists()  # the full-size output under its temporary name
    scratch = tmp_path / f".netvlad-rows-{dead_pid()}-abc123.f32"  # a csv run's scratch rows
    scratch.write_bytes(b"\0" * 64)
    alive = tmp_path / ".k.npy.tmp-1"  # PID 1 is running: not provably abandoned
    alive.write_bytes(b"")
    other = tmp_path / ".other.npy.tmp-999999999"  # another output's: not ours to judge
    other.write_bytes(b"")
    assert run(server, "describe", str(directory), "--out", str(out), "--resume") == 0
    err = capsys.readouterr().err
    assert "note: removed 2 temporary file(s) of a run that was killed" in err
    assert not temporary.exists() and not scratch.exists()
    assert alive.exists() and other.exists()
    assert np.load(out).shape == (60, 32)


def test_ctrl_c_against_a_silent_server_returns_within_seconds(server, tmp_path):
    directory = tmp_path / "many"
    images(directory, 60, seed=900)
    out, partial = tmp_path / "d.npy", tmp_path / "d.npy.partial"
    # The default 120 s deadline: only cancelling the calls in flight can end the run promptly.
    command = cli(server, "describe", str(directory), "--out", str(out), "--resume",
                  "--batch-size", "1", "--concurrency", "2")
    process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, env=ENV)
    try:
        wait_for_chunks(partial, 3, process)
        server.pause()  # from now on nothing is answered, for as long as the test lasts
        time.sleep(0.5)
        done = len(list(partial.glob("chunk-*.npz")))
        sent = time.monotonic()
        process.send_signal(signal.SIGINT)
        _, err = process.communicate(timeout=30)
        took = time.monotonic() - sent
    finally:
        process.kill()
        server.resume()
    assert process.returncode == 130, err
    assert took < 5, f"{took:.1f} s from SIGINT to exit"
    assert "Traceback" not in err and "Exception ignored" not in err, err
    assert f"interrupted; {done} of 60 images are saved in {partial}" in err
    saved = [name for chunk in partial.glob("chunk-*.npz") for name in np.load(chunk)["names"]]
    assert len(saved) == done


def test_a_caller_that_stops_early_never_waits_for_calls_in_flight_at_exit(server, tmp_path):
    # A library user breaks out of describe_concurrently and exits while the server is silent,
    # without closing the client: the calls in flight (60 s deadline) must not hold up the exit.
    names = sorted(images(tmp_path / "imgs", 12, seed=1500))
    script = f"""
import os, signal, sys, time
from netvlad_client import NetVLADClient, describe_concurrently
client = NetVLADClient({server.target!r}, timeout=60, retries=0)
results = describe_concurrently(client, [[name] for name in {names!r}], 2)
next(results)
os.kill({server.pid}, signal.SIGSTOP)
time.sleep(0.3)
results.close()
print("leaving", flush=True)
"""
    process = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, env=ENV)
    try:
        assert process.stdout.readline() == "leaving\n", process.communicate()
        left = time.monotonic()
        process.communicate(timeout=60)
        took = time.monotonic() - left
    finally:
        process.kill()
        server.resume()
    assert process.returncode == 0
    assert took < 5, f"{took:.1f} s to exit after the last line"


def test_a_second_ctrl_c_is_quiet(server, tmp_path):
    directory = tmp_path / "many"
    images(directory, 40, seed=1200)
    out, partial = tmp_path / "d.npy", tmp_path / "d.npy.partial"
    command = cli(server, "describe", str(directory), "--out", str(out), "--resume",
                  "--batch-size", "1", "--concurrency", "2")
    for gap in (0.0, 0.05, 0.2):  # the second Ctrl-C during the clean-up, or during the exit
        process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, env=ENV)
        try:
            wait_for_chunks(partial, 1, process)
            server.pause()
            process.send_signal(signal.SIGINT)
            time.sleep(gap)
            process.send_signal(signal.SIGINT)
            _, err = process.communicate(timeout=30)
        finally:
            process.kill()
            server.resume()
        # 130, or killed by the second SIGINT once the interpreter has restored the default
        # handler on its way out (the shell's $? is 130 either way): never a stack dump.
        assert process.returncode in (130, -signal.SIGINT), err
        assert "Exception ignored" not in err and "Traceback" not in err, err
        for chunk in partial.glob("chunk-*.npz"):
            chunk.unlink()


def test_a_reader_that_stops_early_stops_the_describing(server, tmp_path):
    directory = tmp_path / "many"
    images(directory, 120, seed=2000)
    before = server.metric("netvlad_images_total")
    # `describe many --format csv | head -3`
    command = cli(server, "describe", str(directory), "--format", "csv", "--batch-size", "1",
                  "--concurrency", "1")
    child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=ENV)
    lines = [child.stdout.readline() for _ in range(3)]
    child.stdout.close()
    _, err = child.communicate(timeout=120)
    assert child.returncode == 0, err
    assert all(len(line.split(b",")) == 32 for line in lines)
    assert b"standard output was closed by its reader before all 120 x 32" in err
    # Rows leave as they are ready, and the first refused write stops the run.
    assert server.metric("netvlad_images_total") - before < 60


def test_rows_stream_to_standard_output_in_input_order(server, tmp_path):
    pixels = images(tmp_path / "imgs", 10, seed=77)
    files = sorted(pixels, reverse=True)
    for fmt in ("json", "csv", "npy", "bin"):
        command = cli(server, "describe", *files, files[0], "--format", fmt, "--batch-size",
                      "2", "--concurrency", "3")
        done = subprocess.run(command, capture_output=True, timeout=120, env=ENV, check=False)
        assert done.returncode == 0, done.stderr
        expected = np.stack([reference(pixels[f]) for f in [*files, files[0]]])
        if fmt == "json":
            entries = json.loads(done.stdout)
            assert [entry["name"] for entry in entries] == [*files, files[0]]
            got = np.array([entry["descriptor"] for entry in entries], np.float32)
        elif fmt == "csv":
            got = np.loadtxt(done.stdout.decode().splitlines(), delimiter=",", dtype=np.float32)
        elif fmt == "npy":
            import io

            got = np.load(io.BytesIO(done.stdout))
        else:
            got = np.frombuffer(done.stdout, "<f4").reshape(11, 32)
        np.testing.assert_allclose(got, expected, atol=ATOL, rtol=0)


def test_a_closed_standard_error_changes_nothing(server, tmp_path):
    pixels = images(tmp_path / "imgs", 4, seed=5)
    out = tmp_path / "d.npy"
    read_end, write_end = os.pipe()
    os.close(read_end)  # every message meets a closed pipe
    try:
        done = subprocess.run(cli(server, "describe", str(tmp_path / "imgs"), "--out", str(out)),
                              stderr=write_end, timeout=120, env=ENV, check=False)
    finally:
        os.close(write_end)
    assert done.returncode == 0
    np.testing.assert_allclose(np.load(out), np.stack([reference(pixels[p])
                                                       for p in sorted(pixels)]), atol=ATOL)
    # `describe X 2>&1 | head -c 300`: output and messages share the pipe its reader closes.
    for _ in range(4):
        child = subprocess.Popen(cli(server, "describe", str(tmp_path / "imgs")),
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=ENV)
        assert len(child.stdout.read(300)) == 300
        child.stdout.close()
        assert child.wait(120) == 0


# ------------------------------------------------------------------------------ folder scans


def test_folders_give_pnm_images_and_say_what_they_skip(server, tmp_path, capsys):
    import cv2

    directory = tmp_path / "scan"
    directory.mkdir()
    gray, rgb = random_image(11, 32, 40, channels=1), random_image(12, 32, 40)
    cv2.imwrite(str(directory / "a.pgm"), gray)
    cv2.imwrite(str(directory / "b.ppm"), rgb[:, :, ::-1])
    (directory / "c.pnm").write_bytes((directory / "a.pgm").read_bytes())
    (directory / "gone.png").symlink_to(tmp_path / "nowhere.png")
    elsewhere = tmp_path / "elsewhere"
    images(elsewhere, 1)
    (directory / "linked").symlink_to(elsewhere, target_is_directory=True)
    out = tmp_path / "d.npz"
    assert run(server, "describe", str(directory), "-r", "--out", str(out)) == 0
    err = capsys.readouterr().err
    with np.load(out) as data:
        assert [Path(n).name for n in data["names"]] == ["a.pgm", "b.ppm", "c.pnm"]
        np.testing.assert_allclose(data["descriptors"],
                                   np.stack([reference(gray), reference(rgb), reference(gray)]),
                                   atol=ATOL, rtol=0)
    assert f"note: skipped broken symbolic links: {directory / 'gone.png'}" in err
    assert f"did not follow symbolic links to folders (pass the folders themselves to describe " \
           f"them): {directory / 'linked'}" in err


# ------------------------------------------------------------------ the library's scheduler


def test_run_concurrently_keeps_at_most_concurrency_in_flight_and_starts_none_after_a_failure():
    from netvlad_client.bulk import run_concurrently

    lock = threading.Lock()
    state = {"running": 0, "most": 0, "started": []}

    def work(chunk: int) -> int:
        with lock:
            state["running"] += 1
            state["most"] = max(state["most"], state["running"])
            state["started"].append(chunk)
            assert threading.current_thread().daemon  # never joined at interpreter exit
        if chunk != 5:
            time.sleep(0.05)
        with lock:
            state["running"] -= 1
        if chunk == 5:
            raise RuntimeError("chunk 5 failed")
        return chunk * 10

    got = {}
    with pytest.raises(RuntimeError, match="chunk 5 failed"):
        for index, result in run_concurrently(work, list(range(40)), 3):
            got[index] = result
    assert state["most"] == 3
    # Chunk 5 fails at once, with at most two others in flight; none starts after it failed.
    assert max(state["started"]) <= 6
    assert all(got[i] == i * 10 for i in got) and 5 not in got
    assert set(got) == set(state["started"]) - {5}  # those in flight were still yielded

    state.update(running=0, most=0, started=[])
    results = run_concurrently(work, list(range(100, 140)), 2)
    next(results)
    results.close()  # the caller stops (Ctrl-C, a closed output): nothing more starts
    time.sleep(0.1)
    assert len(state["started"]) <= 3


# ------------------------------------------------------------------- the same for `evaluate`


def test_evaluate_skips_bad_images_with_their_ground_truth(server, tmp_path, capsys):
    folder = tmp_path / "seq"
    pixels = images(folder, 12, seed=3000)
    bad = folder / "0004.png"
    bad.write_bytes(b"not an image")
    del pixels[str(bad)]
    positions = tmp_path / "xyz.txt"
    positions.write_text("".join(f"{i % 6} 0 0\n" for i in range(12)))  # a loop of 6 places
    out = tmp_path / "o"
    args = ["evaluate", "--images", str(folder), "--positions", str(positions), "--dims", "all",
            "--suppression", "3", "--no-plots", "--out", str(out)]
    assert run(server, *args) == 1  # strict by default
    err = capsys.readouterr().err
    assert f"refused {bad} (input #4)" in err and "--on-error skip" in err
    assert not (out / "summary.json").exists()
    assert run(server, *args, "--on-error", "skip") == 0
    err = capsys.readouterr().err
    assert "left out 1 frames whose image was skipped (--on-error skip), with their ground " \
           "truth: 0004.png" in err
    saved = np.load(out / "descriptors.npy")
    assert np.isnan(saved[4]).all() and np.isfinite(np.delete(saved, 4, axis=0)).all()
    np.testing.assert_allclose(np.delete(saved, 4, axis=0),
                               np.stack([reference(pixels[p]) for p in sorted(pixels)]),
                               atol=ATOL, rtol=0)
    table = (out / "descriptors.npy.skipped.tsv").read_text().splitlines()
    assert table[1].startswith(f"{bad}\t4\tINVALID_ARGUMENT: ")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["results"]
