"""`netvlad-client index` against a real in-process server (demo-tiny, --index-dir on disk).

create/list/add/query/remove/export/import/drop through `main`, the answers checked against the
network itself and NumPy; resumable adds; bad inputs refused in one line; tokens.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from client_support import random_image, reference, write_png
from netvlad_client import NetVLADClient
from netvlad_client.bench.harness import free_port
from netvlad_client.cli import main
from netvlad_client.evaluation import read_descriptors
from server_thread import ServerThread, tiny_config

DIMS = 16


@pytest.fixture(scope="module")
def server(tiny_model, tmp_path_factory):
    """A server taking at most 5 places per AddPlaces request: adds and imports need several."""
    config = tiny_config(free_port(), index_dir=str(tmp_path_factory.mktemp("indexes")),
                         max_places_per_request=5)
    with ServerThread(config, lambda _config: tiny_model) as running:
        yield running


_names = iter(range(10**6))


@pytest.fixture()
def name(server) -> str:
    made = f"cli{next(_names)}"
    assert run(server, "index", "create", made, "--dims", str(DIMS)) == 0
    return made


def run(server, *args: str, environ: dict[str, str] | None = None) -> int:
    """netvlad-client --target SERVER ARGS in this process."""
    return main(["--target", server.target, *args], environ if environ is not None else {})


def frames(directory: Path, count: int, seed: int = 0) -> dict[str, np.ndarray]:
    """PNG keyframes named by their timestamp in seconds (100.000000.png, 100.500000.png...)."""
    directory.mkdir(exist_ok=True)
    made = {}
    for i in range(count):
        pixels = random_image(seed + i, 24, 32)
        made[str(write_png(directory / f"{100 + i * 0.5:.6f}.png", pixels))] = pixels
    return made


def unit(row: np.ndarray) -> np.ndarray:
    return row / np.linalg.norm(row)


def one_line_error(capsys, *words: str) -> str:
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    for word in words:
        assert word in err, err
    return err


def test_add_a_folder_then_query_ranks_like_brute_force(server, name, tmp_path, capsys):
    images = frames(tmp_path / "kf", 12)
    assert run(server, "index", "add", name, str(tmp_path / "kf"), "--timestamps", "name",
               "--metadata", "run=lab,robot=r1", "--progress", "never") == 0
    assert "added 12 places" in capsys.readouterr().err
    probe = list(images)[5]
    assert run(server, "index", "query", name, probe, "-k", "4", "--json") == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    stored = {path: unit(reference(pixels)[:DIMS]) for path, pixels in images.items()}
    query = unit(reference(images[probe])[:DIMS])
    expected = sorted(stored, key=lambda path: -float(stored[path] @ query))[:4]
    assert [row["id"] for row in rows] == expected
    assert rows[0]["id"] == probe and rows[0]["similarity"] == pytest.approx(1.0, abs=1e-5)
    for row in rows:
        assert row["similarity"] == pytest.approx(float(stored[row["id"]] @ query), abs=1e-5)
        assert row["timestamp"] == pytest.approx(float(Path(row["id"]).stem))
        assert row["metadata"] == {"run": "lab", "robot": "r1"}
    # Temporal exclusion: nothing within 1.1 s of the query's own time.
    stamp = float(Path(probe).stem)
    assert run(server, "index", "query", name, probe, "--json", "--timestamp", str(stamp),
               "--exclude-within-seconds", "1.1") == 0
    ids = [json.loads(line)["id"] for line in capsys.readouterr().out.splitlines()]
    assert len(ids) == 7 and all(abs(float(Path(i).stem) - stamp) > 1.1 for i in ids)
    # The table form: a header and one row per match, best first.
    assert run(server, "index", "query", name, probe, "-k", "3") == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split() == ["RANK", "SIMILARITY", "TIMESTAMP", "ID"]
    assert [line.split()[-1] for line in table[1:]] == expected[:3]


def test_list_remove_export_import_drop(server, name, tmp_path, capsys):
    images = frames(tmp_path / "kf", 6, seed=40)
    assert run(server, "index", "add", name, *images, "--id", "stem") == 0
    capsys.readouterr()
    assert run(server, "index", "list", "--json") == 0
    listed = {row["name"]: row for row in json.loads(capsys.readouterr().out)}
    assert listed[name]["size"] == 6 and listed[name]["dims"] == DIMS
    assert run(server, "index", "list") == 0
    line = next(row for row in capsys.readouterr().out.splitlines() if row.startswith(name))
    assert line.split()[1:4] == ["6", str(DIMS), "exact"]

    assert run(server, "index", "remove", name, "100.000000", "nope") == 0
    assert "removed 1 places" in capsys.readouterr().err

    out = tmp_path / "map.npz"
    assert run(server, "index", "export", name, str(out)) == 0
    assert "wrote 5 places" in capsys.readouterr().err
    with np.load(out) as archive:
        assert list(archive["ids"]) == [f"{100 + i * 0.5:.6f}" for i in range(1, 6)]
        assert archive["descriptors"].shape == (5, DIMS)
        assert np.isnan(archive["positions"]).all()
        for row, pixels in zip(archive["descriptors"], list(images.values())[1:], strict=True):
            np.testing.assert_allclose(row, unit(reference(pixels)[:DIMS]), atol=1e-5)
    loaded = read_descriptors(out)  # what evaluate --descriptors reads
    assert list(loaded.names) == [f"{100 + i * 0.5:.6f}" for i in range(1, 6)]
    assert loaded.values.shape == (5, DIMS)

    copy = f"{name}-copy"
    assert run(server, "index", "import", copy, str(out)) == 1
    one_line_error(capsys, copy, "--create")
    assert run(server, "index", "import", copy, str(out), "--create") == 0
    assert "imported 5 places" in capsys.readouterr().err
    with NetVLADClient(server.target) as client:
        again = client.export_places(copy)
    assert again.ids == [f"{100 + i * 0.5:.6f}" for i in range(1, 6)]

    assert run(server, "index", "drop", copy) == 1
    one_line_error(capsys, "--yes")
    assert run(server, "index", "drop", copy, "--yes") == 0
    assert "dropped" in capsys.readouterr().err
    with NetVLADClient(server.target) as client:
        assert copy not in {info.name for info in client.list_indexes()}


def test_add_resumes_from_its_checkpoint_and_skips_bad_images(server, name, tmp_path, capsys):
    images = frames(tmp_path / "kf", 5, seed=70)
    (tmp_path / "kf" / "200.000000.png").write_bytes(b"not a png")
    work = tmp_path / "work"
    work.mkdir()
    assert run(server, "index", "add", name, str(tmp_path / "kf"), "--resume", "--work-dir",
               str(work), "--batch-size", "2") == 1
    assert (work / f"{name}.index-add.partial").is_dir()  # described work kept
    capsys.readouterr()
    assert run(server, "index", "add", name, str(tmp_path / "kf"), "--resume", "--work-dir",
               str(work), "--batch-size", "2", "--on-error", "skip") == 0
    err = capsys.readouterr().err
    assert "resuming:" in err and "added 5 places" in err and "skipped 1 images" in err
    assert not (work / f"{name}.index-add.partial").exists()
    with NetVLADClient(server.target) as client:
        arrays = client.export_places(name)
    assert sorted(arrays.ids) == sorted(images)


def test_bad_inputs_fail_in_one_line(server, name, tmp_path, capsys):
    image = write_png(tmp_path / "a.png", random_image(1, 24, 32))
    cases = [
        (("index", "add", "no-such-index", str(image)), ("no-such-index", "create it first")),
        (("index", "query", "no-such-index", str(image)), ("NOT_FOUND", "no-such-index")),
        (("index", "query", name, str(tmp_path / "missing.png")), ("not found",)),
        (("index", "query", name, str(image), "--exclude-within-seconds", "3"),
         ("--timestamp",)),
        (("index", "add", name, str(image), "--timestamps", "name"), ("timestamp", "a.png")),
        (("index", "add", name, str(image), "--metadata", "oops"), ("KEY=VALUE",)),
        (("index", "export", name, str(tmp_path / "out.npy")), (".npz",)),
        (("index", "create", name), ("ALREADY_EXISTS",)),
        (("index", "create", "bad/name"), ("INVALID_ARGUMENT", "bad/name")),
    ]
    for args, words in cases:
        assert run(server, *args) == 1, args
        one_line_error(capsys, *words)
    with pytest.raises(SystemExit):
        run(server, "index", "query", name, str(image), "-k", "0")
    assert "-k" in capsys.readouterr().err


def test_index_target_and_token_from_the_environment(tiny_model, tmp_path, capsys):
    tokens = tmp_path / "tokens"
    tokens.write_text("index-token-0123456789abcdef\n")
    config = tiny_config(free_port(), index_dir=str(tmp_path / "idx"), token_file=str(tokens))
    (tmp_path / "token").write_text("index-token-0123456789abcdef\n")
    with ServerThread(config, lambda _config: tiny_model) as running:
        environ = {"NETVLAD_INDEX_TARGET": running.target,
                   "NETVLAD_CLIENT_TOKEN_FILE": str(tmp_path / "token")}
        # --target names a closed port: every index call must go to NETVLAD_INDEX_TARGET.
        closed = f"127.0.0.1:{free_port()}"
        assert main(["--target", closed, "index", "create", "tok", "--dims", "8"], environ) == 0
        assert main(["--target", closed, "index", "list", "--json"], environ) == 0
        assert [row["name"] for row in json.loads(capsys.readouterr().out)] == ["tok"]
        assert main(["--target", running.target, "--retries", "0", "index", "list"], {}) == 1
        one_line_error(capsys, "UNAUTHENTICATED")
