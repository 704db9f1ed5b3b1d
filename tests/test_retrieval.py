"""Retrieval recall@N (`netvlad_client.retrieval`) and `netvlad-client evaluate-retrieval`.

Benchmarks are generated here: MATLAB dbStruct files written with scipy's savemat the way the
Pittsburgh / Tokyo 24/7 files are laid out, and CSV files. Synthetic descriptors built from
orthonormal codes give every query a known rank for its true place, hence known recall@N. Every
malformed input gets its own error; one run describes real images through a real tiny server.
"""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from netvlad_client.cli import main as cli_main
from netvlad_client.retrieval import (
    Benchmark,
    ImageSet,
    RetrievalError,
    choose_examples,
    evaluate_retrieval,
    plot_examples,
    plot_recall_curve,
    prepare_descriptors,
    read_csv_benchmark,
    read_dbstruct,
    read_position_csv,
    write_per_query_csv,
    write_per_query_json,
)
from scipy.io import savemat

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
EASTING, NORTHING = 585000.0, 4477000.0  # somewhere in Pittsburgh, UTM zone 17


def cell(names: list[str]) -> np.ndarray:
    """A MATLAB cell array (N x 1) of strings, as dbImageFns / qImageFns are stored."""
    out = np.empty((len(names), 1), dtype=object)
    out[:, 0] = names
    return out


def write_dbstruct(path: Path, db_names: list[str], utm_db: np.ndarray, q_names: list[str],
                   utm_q: np.ndarray, drop: tuple[str, ...] = (), **override: object) -> Path:
    """A .mat file holding `dbStruct` with the fields of Relja Arandjelović's files."""
    fields = {
        "whichSet": "test",
        "dbImageFns": cell(db_names),
        "utmDb": np.asarray(utm_db, dtype=np.float64),
        "qImageFns": cell(q_names),
        "utmQ": np.asarray(utm_q, dtype=np.float64),
        "numImages": float(len(db_names)),
        "numQueries": float(len(q_names)),
        "posDistThr": 25.0,
        "posDistSqThr": 625.0,
        "nonTrivPosDistSqThr": 100.0,
    }
    fields.update(override)
    savemat(path, {"dbStruct": {k: v for k, v in fields.items() if k not in drop}})
    return path


def orthonormal(count: int, dims: int, seed: int = 0) -> np.ndarray:
    """`count` orthonormal rows of length `dims`."""
    q, _ = np.linalg.qr(np.random.default_rng(seed).standard_normal((dims, count)))
    return q.T.astype(np.float32)


def known_benchmark(root: Path) -> tuple[Benchmark, np.ndarray, np.ndarray, dict[int, float]]:
    """40 database places 50 m apart, 10 queries whose true place ranks are known.

    Queries 0-5 find their place first; 6 at rank 2; 7 at rank 7; 8 at rank 15; query 9 stands
    where no database image is within 25 m. So recall@1/5/10/20 = 6, 7, 8, 9 out of 10.
    """
    codes = orthonormal(40, 64)
    db_positions = np.column_stack([EASTING + 50.0 * np.arange(40), np.full(40, NORTHING)])
    true_place = [0, 3, 7, 12, 25, 39, 10, 14, 30, 5]
    q_positions = db_positions[true_place] + [3.0, -4.0]
    q_positions[9] = [EASTING + 1025.0, NORTHING + 500.0]  # nowhere near the route
    queries = np.zeros((10, 64), dtype=np.float32)
    for i in range(6):
        queries[i] = codes[true_place[i]]
    wrong = [p for p in range(40) if p not in true_place]

    def ranked(rank: int, true: int) -> np.ndarray:
        # rank-1 wrong places before the true one, weights strictly decreasing
        weights = np.linspace(1.0, 0.5, rank)
        order = [*wrong[: rank - 1], true]
        return (weights[:, None] * codes[order]).sum(axis=0)

    queries[6] = ranked(2, 10)
    queries[7] = ranked(7, 14)
    queries[8] = ranked(15, 30)
    queries[9] = codes[5]  # looks like place 5, which is 500 m away
    bench = Benchmark(
        name="known",
        database=ImageSet([f"db/{i:03d}.png" for i in range(40)], db_positions, root),
        queries=ImageSet([f"q/{i:03d}.png" for i in range(10)], q_positions, root),
        radius=25.0,
        source="test",
    )
    return bench, codes, queries, {1: 0.6, 5: 0.7, 10: 0.8, 20: 0.9}


def write_images(images: ImageSet, seed: int = 0) -> None:
    """A small distinct PNG for every image of the set (for the example figure)."""
    from matplotlib.image import imsave

    rng = np.random.default_rng(seed)
    for name in images.paths:
        path = images.root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        imsave(path, rng.integers(0, 256, size=(24, 32, 3), dtype=np.uint8))


def assert_png(path: Path) -> np.ndarray:
    """The file is a PNG that decodes to a real picture; its pixels (0..1 floats)."""
    from matplotlib.image import imread

    assert path.read_bytes()[:8] == PNG_SIGNATURE, path
    picture = imread(path)
    assert picture.ndim == 3 and min(picture.shape[:2]) >= 200, picture.shape
    return picture


def colour_pixels(picture: np.ndarray, hex_colour: str) -> int:
    """How many pixels have (nearly) this colour."""
    rgb = np.array([int(hex_colour[i : i + 2], 16) for i in (1, 3, 5)]) / 255
    return int(np.sum(np.abs(picture[:, :, :3] - rgb).max(axis=2) < 0.02))


# --------------------------------------------------------------------------- known answers


def test_known_ranks_give_known_recall(tmp_path):
    bench, codes, queries, expected = known_benchmark(tmp_path)
    result = evaluate_retrieval(bench, codes, queries)
    assert result.recall_at == pytest.approx(expected, abs=1e-12)
    assert result.first_correct_rank.tolist() == [1, 1, 1, 1, 1, 1, 2, 7, 15, 0]
    assert result.queries_without_positive == 1
    assert result.positives.tolist() == [1] * 9 + [0]
    assert result.retrieved[0, 0] == 0 and result.retrieved[6, :2].tolist() == [1, 10]
    assert result.retrieved.shape == (10, 20) and result.dims == 64
    np.testing.assert_allclose(result.scores[:6, 0], 1.0, atol=1e-6)  # cosine of equal codes
    assert result.retrieved_distance[0, 0] == pytest.approx(5.0)  # the (3, -4) offset
    curve = result.recall_curve()
    assert curve.tolist() == pytest.approx(
        [0.6] + [0.7] * 5 + [0.8] * 8 + [0.9] * 6, abs=1e-12
    )
    summary = result.summary()
    assert summary["recall_at"] == {"1": 0.6, "5": 0.7, "10": 0.8, "20": 0.9}
    assert summary["queries_without_positive"] == 1 and summary["radius_m"] == 25.0


def test_radius_decides_what_is_correct(tmp_path):
    bench, codes, queries, _ = known_benchmark(tmp_path)
    # 5 m off: correct within 5 m (the boundary counts), wrong within 4.9 m.
    assert evaluate_retrieval(bench, codes, queries, radius=5.0).recall_at[1] == 0.6
    tight = evaluate_retrieval(bench, codes, queries, radius=4.9)
    assert tight.recall_at == {1: 0.0, 5: 0.0, 10: 0.0, 20: 0.0}
    assert tight.queries_without_positive == 10
    # 60 m: the neighbouring places (50 m apart) count too.
    wide = evaluate_retrieval(bench, codes, queries, radius=60.0)
    assert wide.positives[0] == 2 and wide.positives[3] == 3


def test_dims_truncate_and_renormalise(tmp_path):
    # Full length, the query is nearer the far place (cos 0.5 vs 0); in the first two values the
    # true place wins (cos 0.995 vs 0).
    positions = np.array([[EASTING, NORTHING], [EASTING + 500, NORTHING]])
    bench = Benchmark(
        "dims",
        ImageSet(["a.png", "b.png"], positions, tmp_path),
        ImageSet(["q.png"], positions[:1] + 1.0, tmp_path),
        25.0,
        "test",
    )
    db = np.array([[1, 0.1, 0, -1], [0, 1, 0, 1]], dtype=np.float32)
    q = np.array([[1, 0, 0, 1]], dtype=np.float32)
    assert evaluate_retrieval(bench, db, q).retrieved[0].tolist() == [1, 0]
    two = evaluate_retrieval(bench, db, q, dims=2)
    assert two.retrieved[0].tolist() == [0, 1] and two.dims == 2
    assert two.scores[0, 0] == pytest.approx(1 / np.sqrt(1.01), rel=1e-6)
    x = prepare_descriptors(db, 2, "db")
    np.testing.assert_allclose(np.linalg.norm(x, axis=1), 1.0, rtol=1e-6)
    np.testing.assert_allclose(x[0], np.array([1, 0.1]) / np.sqrt(1.01), rtol=1e-6)


def test_per_query_json_and_csv(tmp_path):
    bench, codes, queries, _ = known_benchmark(tmp_path)
    result = evaluate_retrieval(bench, codes, queries)
    data = json.loads(write_per_query_json(result, tmp_path / "per_query.json").read_text())
    assert data["recall_at"]["5"] == 0.7 and len(data["per_query"]) == 10
    q7 = data["per_query"][7]
    assert q7["path"] == "q/007.png" and q7["first_correct_rank"] == 7
    assert q7["correct_at"] == {"1": False, "5": False, "10": True, "20": True}
    assert [r["correct"] for r in q7["retrieved"][:7]] == [False] * 6 + [True]
    hit = q7["retrieved"][6]
    assert (hit["database"], hit["path"], hit["correct"]) == (14, "db/014.png", True)
    assert hit["distance_m"] == pytest.approx(5.0)
    assert hit["score"] < q7["retrieved"][5]["score"]  # best first
    assert data["per_query"][9]["first_correct_rank"] is None
    assert data["per_query"][9]["positives"] == 0
    with write_per_query_csv(result, tmp_path / "per_query.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 10
    assert rows[6]["first_correct_rank"] == "2" and rows[6]["correct_at_1"] == "0"
    assert rows[6]["correct_at_5"] == "1" and rows[6]["top1_path"] == "db/001.png"
    assert rows[6]["retrieved"].split(";")[:2] == ["1", "10"]
    assert float(rows[0]["easting"]) == pytest.approx(EASTING + 3.0)


def test_figures_frame_correct_green_and_wrong_red(tmp_path):
    bench, codes, queries, _ = known_benchmark(tmp_path)
    write_images(bench.database)
    write_images(bench.queries, seed=1)
    result = evaluate_retrieval(bench, codes, queries)
    chosen = choose_examples(result, 4)
    # Half the examples are failures at rank 1 (queries 6-9), the rest spread over all.
    assert len(chosen) == 4 and sum(q >= 6 for q in chosen) >= 2
    picture = assert_png(plot_examples(result, tmp_path / "examples.png", [0, 6]))
    green, red = colour_pixels(picture, "#1a9641"), colour_pixels(picture, "#d7191c")
    # Query 0: 1 green of 5; query 6: 1 green (rank 2), 4 red: 2 green frames, 8 red frames.
    assert green > 200 and red > 3 * green
    only_right = assert_png(plot_examples(result, tmp_path / "right.png", [0], top=1))
    assert colour_pixels(only_right, "#d7191c") == 0 and colour_pixels(only_right, "#1a9641")
    assert_png(plot_recall_curve(result, tmp_path / "recall.png"))


# --------------------------------------------------------------------------- dbStruct files


def pitts_like(tmp_path: Path, **kwargs: object) -> Path:
    """A small Pittsburgh-style dbStruct: 5 database images, 3 queries."""
    db_names = [f"000/00000{i}_pitch1_yaw{i}.jpg" for i in range(5)]
    utm_db = np.array([EASTING + 10.0 * np.arange(5), np.full(5, NORTHING)])
    q_names = [f"000/00000{i}_pitch2_yaw1.jpg" for i in range(3)]
    utm_q = np.array([EASTING + 10.0 * np.arange(3) + 1, np.full(3, NORTHING)])
    return write_dbstruct(tmp_path / "pitts30k_test.mat", db_names, utm_db, q_names, utm_q,
                          **kwargs)


def test_dbstruct_is_read_by_field_name(tmp_path):
    bench = read_dbstruct(pitts_like(tmp_path), tmp_path / "Pittsburgh",
                          tmp_path / "Pittsburgh" / "queries_real")
    assert bench.database.paths[4] == "000/000004_pitch1_yaw4.jpg"
    assert bench.queries.paths == [f"000/00000{i}_pitch2_yaw1.jpg" for i in range(3)]
    np.testing.assert_array_equal(bench.database.positions[:, 0], EASTING + 10.0 * np.arange(5))
    assert bench.database.positions.shape == (5, 2) and bench.queries.positions.shape == (3, 2)
    assert bench.radius == 25.0
    assert bench.queries.files()[0] == (
        tmp_path / "Pittsburgh" / "queries_real" / "000" / "000000_pitch2_yaw1.jpg"
    )
    # Default roots: the file's folder, the queries under the same root.
    plain = read_dbstruct(pitts_like(tmp_path))
    assert plain.database.root == plain.queries.root == tmp_path
    # The radius from posDistSqThr alone, or from posDistThr.
    sq = read_dbstruct(pitts_like(tmp_path, drop=("posDistThr",), posDistSqThr=100.0))
    assert sq.radius == 10.0
    assert read_dbstruct(pitts_like(tmp_path, drop=("posDistThr", "posDistSqThr"))).radius == 25
    # Optional fields may be missing altogether.
    minimal = pitts_like(tmp_path, drop=("whichSet", "numImages", "numQueries",
                                         "nonTrivPosDistSqThr"))
    assert len(read_dbstruct(minimal).database.paths) == 5


def test_dbstruct_with_one_image_each(tmp_path):
    path = write_dbstruct(tmp_path / "one.mat", ["a.jpg"], [[EASTING], [NORTHING]], ["q.jpg"],
                          [[EASTING], [NORTHING]])
    bench = read_dbstruct(path)
    assert bench.database.paths == ["a.jpg"] and bench.queries.positions.shape == (1, 2)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"drop": ("utmQ",)}, r"lacks the field\(s\) utmQ"),
        ({"drop": ("dbImageFns", "qImageFns")}, r"lacks the field\(s\) dbImageFns, qImageFns"),
        ({"numImages": 6.0}, "numImages says 6 but dbImageFns lists 5"),
        ({"numQueries": 2.0}, "numQueries says 2 but qImageFns lists 3"),
        ({"utmDb": np.zeros((2, 4))}, "utmDb has 4 positions but there are 5 image names"),
        ({"utmQ": np.zeros((3, 2))}, r"utmQ must be a 2 x N.*looks transposed"),
        ({"utmQ": np.zeros((3, 3))}, r"utmQ must be a 2 x N numeric matrix"),
        ({"utmDb": np.full((2, 5), np.nan)}, "utmDb column 1 holds NaN"),
        ({"posDistSqThr": 400.0}, r"posDistSqThr 400 is not posDistThr\^2"),
        ({"posDistThr": -1.0, "posDistSqThr": 1.0}, "radius .posDistThr. must be positive"),
        ({"posDistThr": np.array([1.0, 2.0])}, "posDistThr must be a single number"),
        ({"qImageFns": cell([])}, "qImageFns is empty"),
        ({"dbImageFns": np.array([1.0, 2.0, 3.0, 4.0, 5.0])}, "dbImageFns must be a cell array"),
        ({"qImageFns": cell(["a.jpg", "", "c.jpg"])}, "qImageFns entry 2 is an empty"),
    ],
)
def test_malformed_dbstruct_files(tmp_path, kwargs, message):
    with pytest.raises(RetrievalError, match=message):
        read_dbstruct(pitts_like(tmp_path, **kwargs))


def test_not_a_dbstruct_file(tmp_path):
    savemat(tmp_path / "other.mat", {"features": np.ones((2, 2))})
    with pytest.raises(RetrievalError, match=r"no dbStruct variable.*holds: features"):
        read_dbstruct(tmp_path / "other.mat")
    savemat(tmp_path / "array.mat", {"dbStruct": np.ones((2, 2))})
    with pytest.raises(RetrievalError, match="dbStruct variable is not a MATLAB struct"):
        read_dbstruct(tmp_path / "array.mat")
    (tmp_path / "text.mat").write_text("not a mat file at all\n" * 20)
    with pytest.raises(RetrievalError, match=r"not a readable MATLAB \.mat file"):
        read_dbstruct(tmp_path / "text.mat")
    with pytest.raises(RetrievalError, match="does not exist"):
        read_dbstruct(tmp_path / "missing.mat")
    cell_entries = cell(["a.jpg", "b.jpg"])
    cell_entries[1, 0] = np.ones(3)
    path = write_dbstruct(tmp_path / "bad.mat", ["x.jpg", "y.jpg"], np.zeros((2, 2)),
                          ["a.jpg", "b.jpg"], np.zeros((2, 2)), qImageFns=cell_entries)
    with pytest.raises(RetrievalError, match="qImageFns entry 2 is not a string"):
        read_dbstruct(path)


# --------------------------------------------------------------------------- CSV files


def test_csv_files(tmp_path):
    (tmp_path / "db.csv").write_text(
        "path,easting,northing\n# a comment\nimgs/a.jpg,585000.5,4477000\n\n"
        '"imgs/with, comma.jpg", 585010 , 4477001\n'
    )
    images = read_position_csv(tmp_path / "db.csv")
    assert images.paths == ["imgs/a.jpg", "imgs/with, comma.jpg"]
    np.testing.assert_array_equal(images.positions, [[585000.5, 4477000], [585010, 4477001]])
    assert images.root == tmp_path
    (tmp_path / "q.csv").write_text("/abs/q.jpg,585000,4477000\n")  # no header, absolute path
    bench = read_csv_benchmark(tmp_path / "db.csv", tmp_path / "q.csv", tmp_path / "r")
    assert bench.queries.files() == [Path("/abs/q.jpg")]
    assert bench.database.files()[0] == tmp_path / "r" / "imgs" / "a.jpg"
    assert bench.radius == 25.0


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("a.jpg,1\n", r"line 1: expected 3 fields \(path,easting,northing\), got 2"),
        ("a.jpg,1,2\nb.jpg,1,2,3\n", "line 2: expected 3 fields"),
        ("path,easting,northing\na.jpg,one,2\n", "line 2: easting and northing must be numbers"),
        ("a.jpg,1,2\n,3,4\n", "line 2: the image path is empty"),
        ("a.jpg,inf,2\n", "line 1: the position is not finite"),
        ("path,easting,northing\n", "lists no images"),
        ("name,x,y\npath,easting,northing\n", "line 2: easting and northing must be numbers"),
        ("", "lists no images"),
    ],
)
def test_malformed_csv_files(tmp_path, text, message):
    (tmp_path / "bad.csv").write_text(text)
    with pytest.raises(RetrievalError, match=message):
        read_position_csv(tmp_path / "bad.csv")


def test_unreadable_csv_file(tmp_path):
    with pytest.raises(RetrievalError, match="cannot read CSV file"):
        read_position_csv(tmp_path / "missing.csv")
    (tmp_path / "binary.csv").write_bytes(b"\xff\xfe\x00\x81" * 10)
    with pytest.raises(RetrievalError, match="is not a text CSV file"):
        read_position_csv(tmp_path / "binary.csv")


def test_bad_descriptors_are_refused(tmp_path):
    bench, codes, queries, _ = known_benchmark(tmp_path)
    with pytest.raises(RetrievalError, match="39 database descriptors for 40 images"):
        evaluate_retrieval(bench, codes[:39], queries)
    with pytest.raises(RetrievalError, match="11 query descriptors for 10 images"):
        evaluate_retrieval(bench, codes, np.vstack([queries, queries[:1]]))
    with pytest.raises(RetrievalError, match=r"--dims 65 is outside 1..64"):
        evaluate_retrieval(bench, codes, queries, dims=65)
    with pytest.raises(RetrievalError, match="database descriptors have 64 values and the "
                                             "queries 32"):
        evaluate_retrieval(bench, codes, queries[:, :32])
    zero = codes.copy()
    zero[3] = 0
    with pytest.raises(RetrievalError, match=r"row 3 \(0-based\) is all zeros"):
        evaluate_retrieval(bench, zero, queries)
    bad = queries.copy()
    bad[2, 5] = np.nan
    with pytest.raises(RetrievalError, match=r"query descriptors: row 2 \(0-based\) holds NaN"):
        evaluate_retrieval(bench, codes, bad)
    with pytest.raises(RetrievalError, match="recall@N needs positive"):
        evaluate_retrieval(bench, codes, queries, recall_ns=(0,))


# --------------------------------------------------------------------------- command line


def saved_benchmark(tmp_path: Path) -> dict[str, Path]:
    """The known benchmark as a dbStruct file, images on disk and saved descriptor files."""
    bench, codes, queries, _ = known_benchmark(tmp_path / "root")
    write_images(bench.database)
    write_images(bench.queries, seed=1)
    mat = write_dbstruct(tmp_path / "known.mat", bench.database.paths, bench.database.positions.T,
                         bench.queries.paths, bench.queries.positions.T)
    np.save(tmp_path / "db.npy", codes)
    np.savez(tmp_path / "q.npz", descriptors=queries,
             names=np.array([str(tmp_path / "root" / p) for p in bench.queries.paths]))
    return {"mat": mat, "root": tmp_path / "root", "db": tmp_path / "db.npy",
            "q": tmp_path / "q.npz"}


def test_cli_from_saved_descriptors(tmp_path, capsys):
    paths = saved_benchmark(tmp_path)
    out = tmp_path / "out"
    args = ["evaluate-retrieval", "--dbstruct", str(paths["mat"]), "--db-root", str(paths["root"])]
    args += ["--db-descriptors", str(paths["db"]), "--query-descriptors", str(paths["q"])]
    args += ["--out", str(out), "--examples", "4"]
    assert cli_main(["--target", "127.0.0.1:1", *args]) == 0  # no server is needed
    printed = capsys.readouterr().out
    for line in ("recall@1: 60.00%", "recall@5: 70.00%", "recall@10: 80.00%",
                 "recall@20: 90.00%", "queries without any database image within 25 m: 1"):
        assert line in printed.splitlines(), printed
    summary = json.loads((out / "summary.json").read_text())
    assert summary["recall_at"] == {"1": 0.6, "5": 0.7, "10": 0.8, "20": 0.9}
    assert summary["target"] is None and summary["database_images"] == 40
    assert len(json.loads((out / "per_query.json").read_text())["per_query"]) == 10
    assert (out / "per_query.csv").read_text().count("\n") == 11
    assert_png(out / "recall_at_n.png")
    examples = assert_png(out / "examples.png")
    assert colour_pixels(examples, "#1a9641") and colour_pixels(examples, "#d7191c")

    # CSV form of the same benchmark, --radius overriding, --dims truncating, no figures.
    bench = read_dbstruct(paths["mat"], paths["root"])
    for name, images in (("db.csv", bench.database), ("q.csv", bench.queries)):
        rows = [f"{p},{e},{n}" for p, (e, n) in zip(images.paths, images.positions.tolist(),
                                                    strict=True)]
        (tmp_path / name).write_text("path,easting,northing\n" + "\n".join(rows) + "\n")
    args = ["evaluate-retrieval", "--database", str(tmp_path / "db.csv"), "--queries",
            str(tmp_path / "q.csv"), "--db-root", str(paths["root"]), "--db-descriptors",
            str(paths["db"]), "--query-descriptors", str(paths["q"]), "--radius", "4.9",
            "--no-plots", "--out", str(tmp_path / "csv-out")]
    assert cli_main(args) == 0
    assert "recall@1: 0.00%" in capsys.readouterr().out
    assert not (tmp_path / "csv-out" / "recall_at_n.png").exists()
    assert cli_main([*args[:-2], "--radius", "25", "--dims", "32", "--out",
                     str(tmp_path / "d32")]) == 0
    assert json.loads((tmp_path / "d32" / "summary.json").read_text())["dims"] == 32
    # --dims follows the rule of describe and evaluate: 0 and 'all' both keep every value.
    for every in ("0", "all", "ALL"):
        assert cli_main([*args[:-2], "--radius", "25", "--dims", every, "--out",
                         str(tmp_path / f"d-{every}")]) == 0
        assert json.loads((tmp_path / f"d-{every}" / "summary.json").read_text())["dims"] == 64
    capsys.readouterr()
    for bad, message in (("-1", "integer at least 0, got -1"), ("half", "integer, got 'half'")):
        with pytest.raises(SystemExit):
            cli_main([*args[:-2], "--dims", bad, "--out", str(tmp_path / "bad")])
        assert f"argument --dims: expected an {message}" in capsys.readouterr().err


def test_cli_errors_name_the_problem(tmp_path, capsys):
    paths = saved_benchmark(tmp_path)
    base = ["evaluate-retrieval", "--dbstruct", str(paths["mat"]), "--db-root", str(paths["root"])]
    saved = ["--db-descriptors", str(paths["db"]), "--query-descriptors", str(paths["q"])]
    out = ["--out", str(tmp_path / "o")]

    def error(args: list[str]) -> str:
        assert cli_main(args) == 1
        return capsys.readouterr().err.strip().splitlines()[-1]

    assert "--db-descriptors" in error([*base, "--db-descriptors", str(paths["q"]),
                                        "--query-descriptors", str(paths["q"]), *out])
    # A names-carrying file in another order is refused, naming the row.
    q = np.load(paths["q"])
    np.savez(tmp_path / "shuffled.npz", descriptors=q["descriptors"], names=q["names"][::-1])
    message = error([*base, "--db-descriptors", str(paths["db"]), "--query-descriptors",
                     str(tmp_path / "shuffled.npz"), *out])
    assert "row 0 is" in message and "benchmark's order" in message
    assert "--dims 128 asks for more dimensions than the 64" in error(
        [*base, *saved, "--dims", "128", *out])
    # Images missing under the root: the example figure cannot be drawn; --examples 0 can.
    message = error(["evaluate-retrieval", "--dbstruct", str(paths["mat"]), *saved, *out])
    assert "40 of the 40 database images do not exist under" in message
    assert "--db-root" in message and "--examples 0" in message
    assert cli_main(["evaluate-retrieval", "--dbstruct", str(paths["mat"]), *saved, *out,
                     "--examples", "0"]) == 0
    capsys.readouterr()
    # Describing needs the images: the missing ones are named before any server is asked.
    (paths["root"] / "q" / "003.png").unlink()
    message = error(["--target", "127.0.0.1:1", *base, "--db-descriptors", str(paths["db"]),
                     *out])
    assert "1 of the 10 query images do not exist" in message and "q/003.png" in message
    assert "--query-root" in message
    assert "--database needs --queries" in error(
        ["evaluate-retrieval", "--database", str(tmp_path / "x.csv"), *out])
    with pytest.raises(SystemExit):
        cli_main(["evaluate-retrieval", "--out", str(tmp_path / "o")])
    assert "one of the arguments --dbstruct --database is required" in capsys.readouterr().err


def test_missing_extras_are_named_and_the_thin_client_still_imports(tmp_path):
    paths = saved_benchmark(tmp_path)
    block = "import sys; sys.modules['faiss'] = sys.modules['scipy'] = None; "
    code = block + (
        "import netvlad_client, netvlad_client.retrieval, netvlad_client.cli; "
        "print(sorted(m for m in ('faiss', 'scipy', 'matplotlib', 'tensorflow') "
        "if sys.modules.get(m) is not None))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
    run = ("from netvlad_client.cli import main; sys.exit(main(sys.argv[1:]))")
    for blocked, flag, needed in (
        ("scipy", "--dbstruct", "scipy"),
        ("faiss", "--dbstruct", "faiss-cpu"),
    ):
        code = f"import sys; sys.modules[{blocked!r}] = None; " + run
        args = ["evaluate-retrieval", flag, str(paths["mat"]), "--db-descriptors",
                str(paths["db"]), "--query-descriptors", str(paths["q"]), "--out",
                str(tmp_path / "o"), "--no-plots"]
        done = subprocess.run([sys.executable, "-c", code, *args], capture_output=True,
                              text=True, timeout=120)
        assert done.returncode == 1, done.stderr
        assert f"needs {needed}" in done.stderr and "netvlad-service[eval]" in done.stderr
        assert "Traceback" not in done.stderr


# --------------------------------------------------------------------------- through a server


def test_end_to_end_through_a_real_server(tiny_server_process, tmp_path, capsys):
    from client_support import reference, write_png

    # 12 places 100 m apart; the database sees each place's scene, each of 6 queries sees one of
    # them again with a little sensor noise, standing 8 m away from where the database image was.
    rng = np.random.default_rng(5)
    scenes = rng.integers(0, 256, size=(12, 32, 32), dtype=np.uint8)
    root = tmp_path / "dataset"
    (root / "db").mkdir(parents=True)
    (root / "queries").mkdir()
    db_rows, q_rows, q_pixels = [], [], []
    for place in range(12):
        write_png(root / "db" / f"{place:03d}.png", scenes[place])
        db_rows.append(f"db/{place:03d}.png,{EASTING + 100 * place},{NORTHING}")
    for k, place in enumerate([0, 2, 5, 7, 9, 11]):
        noise = rng.integers(-3, 4, size=(32, 32))
        pixels = np.clip(scenes[place].astype(int) + noise, 0, 255).astype(np.uint8)
        write_png(root / "queries" / f"{k:03d}.png", pixels)
        q_rows.append(f"queries/{k:03d}.png,{EASTING + 100 * place + 8},{NORTHING}")
        q_pixels.append(pixels)
    (tmp_path / "db.csv").write_text("\n".join(db_rows) + "\n")
    (tmp_path / "q.csv").write_text("\n".join(q_rows) + "\n")
    out = tmp_path / "out"
    benchmark = ["evaluate-retrieval", "--database", str(tmp_path / "db.csv"), "--queries",
                 str(tmp_path / "q.csv"), "--db-root", str(root)]
    args = ["--target", tiny_server_process.target, *benchmark, "--out", str(out), "--resume",
            "--examples", "3"]
    assert cli_main([*args, "--dims", "64"]) == 1  # the tiny model has 32: refused up front
    assert "--dims 64 asks for more dimensions than the 32 of the server's model" in (
        capsys.readouterr().err)
    assert not (out / "database.npy").exists()

    assert cli_main(args) == 0
    printed = capsys.readouterr()
    assert "recall@1: 100.00%" in printed.out
    assert "queries without any database image within 25 m: 0" in printed.out
    saved_q = np.load(out / "queries.npy")
    np.testing.assert_allclose(saved_q, np.stack([reference(p) for p in q_pixels]), atol=1e-5)
    assert np.load(out / "database.npy").shape == (12, 32)
    assert not (out / "database.npy.partial").exists()  # the checkpoint is gone once done
    per_query = json.loads((out / "per_query.json").read_text())["per_query"]
    assert [q["retrieved"][0]["database"] for q in per_query] == [0, 2, 5, 7, 9, 11]
    assert_png(out / "recall_at_n.png")
    assert_png(out / "examples.png")

    # The saved descriptors repeat the run without the server, with the same answers.
    again = ["--target", "127.0.0.1:1", *benchmark, "--db-descriptors",
             str(out / "database.npy"), "--query-descriptors", str(out / "queries.npy"),
             "--out", str(tmp_path / "again"), "--no-plots"]
    assert cli_main(again) == 0
    assert json.loads((tmp_path / "again" / "per_query.json").read_text())["per_query"] == (
        per_query)
