"""`netvlad-client evaluate-retrieval`: recall@N on a Pittsburgh / Tokyo 24/7 style benchmark.

Reads the database and query images with their positions (a MATLAB dbStruct file or two CSV
files), describes both sets through the server (the same resumable bulk path as `describe`) or
reads saved descriptors, searches every query among the database (faiss, exact) and writes
recall@N, per-query results and the figures. The maths lives in `netvlad_client.retrieval`;
docs/EVALUATION.md says how to run the benchmarks and what to expect.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from netvlad_client import ClientConfig, NetVLADClient
from netvlad_client.cli.bulk import BulkSettings, checkpoint_for, describe_rows
from netvlad_client.cli.common import (
    client_config,
    concurrency_option,
    dims_setting,
    progress_option,
)
from netvlad_client.cli.evaluation_common import (
    Stopped,
    check_dims,
    register_command,
    run_command,
    write_summary,
)
from netvlad_client.formats import read_descriptors
from netvlad_client.options import Option, int_range, positive_float
from netvlad_client.retrieval import (
    DEFAULT_EXAMPLES,
    DEFAULT_RADIUS,
    Benchmark,
    ImageSet,
    RetrievalError,
    RetrievalResult,
    check_missing_images,
    choose_examples,
    evaluate_retrieval,
    plot_examples,
    plot_recall_curve,
    read_csv_benchmark,
    read_dbstruct,
    require,
    write_per_query_csv,
    write_per_query_json,
)
from netvlad_client.rowstore import RowFile

DEFAULT_OUT = Path("retrieval")


INPUTS = "inputs (one benchmark: --dbstruct, or --database with --queries)"
MATHS = "evaluation"
OUTPUTS = "outputs"
OPTIONS: tuple[Option, ...] = (
    Option(("--dbstruct",), "MATLAB dbStruct file of the benchmark (pitts30k_test.mat, "
           "tokyo247.mat, ...): image lists, UTM positions, posDistThr", convert=Path,
           metavar="FILE", group=INPUTS, one_of="benchmark"),
    Option(("--database",), "CSV of the database images: path,easting,northing a row",
           convert=Path, metavar="CSV", group=INPUTS, one_of="benchmark"),
    Option(("--queries",), "CSV of the query images (with --database): path,easting,northing",
           convert=Path, metavar="CSV", group=INPUTS),
    Option(("--db-root",), "folder the database image paths are relative to", convert=Path,
           metavar="DIR", shown_default="the dbStruct's or CSV's folder", group=INPUTS),
    Option(("--query-root",), "folder the query image paths are relative to (Pittsburgh: "
           "ROOT/queries_real)", convert=Path, metavar="DIR", shown_default="--db-root, else "
           "the CSV's folder", group=INPUTS),
    Option(("--db-descriptors",), "saved database descriptors, in list order (any format "
           "`describe --out` writes); skips describing the database", convert=Path,
           metavar="FILE", group=INPUTS),
    Option(("--query-descriptors",), "saved query descriptors, in list order; skips "
           "describing the queries", convert=Path, metavar="FILE", group=INPUTS),
    Option(("--dims",), "use the first N descriptor values, re-normalised to unit length; 0 "
           "or 'all' for every one", default=0, convert=dims_setting, metavar="N",
           shown_default="all", group=MATHS),
    Option(("--radius",), "a retrieved image is correct within this many metres of the query",
           convert=positive_float, metavar="METRES",
           shown_default=f"the dbStruct's posDistThr, else {DEFAULT_RADIUS:g}", group=MATHS),
    Option(("--out",), "folder for summary.json, per_query.json/.csv, the PNGs and described "
           "descriptors", default=DEFAULT_OUT, convert=Path, metavar="DIR", group=OUTPUTS),
    Option(("--examples",), "queries shown in examples.png (query beside its top 5); 0 skips "
           "that figure", default=DEFAULT_EXAMPLES, convert=int_range(0), metavar="N",
           group=OUTPUTS),
    Option(("--no-plots",), "skip both PNG figures (matplotlib then unnecessary)", default=True,
           kind="off", dest="plots", group=OUTPUTS),
    Option(("--resume",), "keep finished requests in OUT/database.npy.partial/ (and queries) "
           "and reuse them when a run is repeated after an interruption", default=False,
           kind="switch", group=OUTPUTS),
    progress_option("progress bar on stderr while describing (auto: on a terminal)", OUTPUTS),
    concurrency_option("requests in flight while describing", OUTPUTS, metavar="N"),
)


@dataclass(frozen=True)
class RetrievalConfig:
    """Everything one `evaluate-retrieval` run needs, built once from the flags."""

    client: ClientConfig | None  # None when both sets come from saved descriptors
    dbstruct: Path | None
    database: Path | None
    queries: Path | None
    db_root: Path | None
    query_root: Path | None
    db_descriptors: Path | None
    query_descriptors: Path | None
    dims: int | None
    radius: float | None
    out: Path
    examples: int
    plots: bool
    resume: bool
    concurrency: int
    progress: str


def register(subparsers: Any) -> None:
    """Add the `evaluate-retrieval` subcommand to the netvlad-client parser."""
    register_command(
        subparsers,
        "evaluate-retrieval",
        "recall@N of queries against a database (Pittsburgh / Tokyo 24/7 style)",
        "Describe a benchmark's database and query images through the server (or read saved "
        "descriptors), find each query's nearest database images (faiss, exact cosine) and "
        "report recall@1/5/10/20 with the positive radius of the benchmark, per-query results "
        "(JSON, CSV) and figures. Needs the 'eval' extra.",
        OPTIONS,
        run,
    )


def config_from_args(args: argparse.Namespace) -> RetrievalConfig:
    """Validate the parsed flags into one RetrievalConfig."""
    if args.database is not None and args.queries is None:
        raise RetrievalError("--database needs --queries CSV (path,easting,northing of queries)")
    if args.dbstruct is not None and args.queries is not None:
        raise RetrievalError(
            "--queries goes with --database; a --dbstruct file lists its own queries"
        )
    describes = args.db_descriptors is None or args.query_descriptors is None
    return RetrievalConfig(
        client=client_config(args, priority="bulk") if describes else None,
        dbstruct=args.dbstruct,
        database=args.database,
        queries=args.queries,
        db_root=args.db_root,
        query_root=args.query_root,
        db_descriptors=args.db_descriptors,
        query_descriptors=args.query_descriptors,
        dims=args.dims or None,
        radius=args.radius,
        out=args.out,
        examples=args.examples,
        plots=args.plots,
        resume=args.resume,
        concurrency=args.concurrency,
        progress=args.progress,
    )


def load_benchmark(config: RetrievalConfig) -> Benchmark:
    """The benchmark from the dbStruct file or the two CSV files."""
    if config.dbstruct is not None:
        return read_dbstruct(config.dbstruct, config.db_root, config.query_root)
    assert config.database is not None and config.queries is not None
    return read_csv_benchmark(
        config.database, config.queries, config.db_root, config.query_root,
        config.radius or DEFAULT_RADIUS,
    )


@dataclass(frozen=True)
class _Set:
    """One side of the benchmark as the command handles it."""

    what: str  # "database" | "queries": also the name of the saved descriptor file
    noun: str  # "database" | "query", as messages name the images
    images: ImageSet
    saved: Path | None  # --db-descriptors / --query-descriptors
    flag: str  # the flag naming the saved file
    root_flag: str  # the flag naming the image folder


def _sets(config: RetrievalConfig, benchmark: Benchmark) -> tuple[_Set, _Set]:
    return (
        _Set("database", "database", benchmark.database, config.db_descriptors, "--db-descriptors",
             "--db-root"),
        _Set("queries", "query", benchmark.queries, config.query_descriptors, "--query-descriptors",
             "--query-root"),
    )


def _read_saved(side: _Set) -> np.ndarray:
    """Saved descriptors of one side, checked against the image list (count, and names if kept)."""
    assert side.saved is not None
    loaded = read_descriptors(side.saved, count=len(side.images.paths))
    if len(loaded.values) != len(side.images.paths):
        raise RetrievalError(
            f"{side.flag} {side.saved} holds {len(loaded.values)} descriptors but the benchmark "
            f"lists {len(side.images.paths)} {side.noun} images; they must match one to one"
        )
    if loaded.names is not None:
        for row, (name, rel) in enumerate(zip(loaded.names, side.images.paths, strict=True)):
            if name != rel and not name.replace("\\", "/").endswith("/" + rel):
                raise RetrievalError(
                    f"{side.flag} {side.saved} row {row} is {name!r} but the benchmark's "
                    f"{side.noun} image {row} is {rel!r}; the descriptors must follow the "
                    f"benchmark's order"
                )
    return loaded.values


def _describe(
    client: NetVLADClient, config: RetrievalConfig, side: _Set, output_dims: int, stderr: TextIO
) -> np.ndarray:
    """Describe one side's images through the server into OUT/<side>.npy; its rows."""
    info = client.info()
    files = [str(f) for f in side.images.files()]
    unique = list(dict.fromkeys(files))
    saved = config.out / f"{side.what}.npy"
    target = config.client.target if config.client else ""
    print(f"describing {len(unique)} {side.what} images through {target}", file=stderr)
    rows = RowFile(unique, output_dims, output=saved, fmt="npy")
    checkpoint = checkpoint_for(saved, info, output_dims, None) if config.resume else None
    try:
        settings = BulkSettings(
            concurrency=config.concurrency, progress=config.progress,
            resume_hint="pass --resume to keep finished work across runs",
        )
        stopped = describe_rows(client, info, rows, settings, checkpoint, stream=stderr)
        if stopped is not None:
            raise Stopped(stopped)
        rows.finish(saved)
    finally:
        rows.discard()
    if checkpoint is not None:
        checkpoint.remove()
    values = np.load(saved, mmap_mode="r")
    print(f"saved the {side.what} descriptors to {saved} (reuse with {side.flag})", file=stderr)
    if len(unique) != len(files):  # an image listed twice gets its row twice
        where = {name: i for i, name in enumerate(unique)}
        values = values[[where[name] for name in files]]
    return values


def _descriptors(
    config: RetrievalConfig, benchmark: Benchmark, stderr: TextIO
) -> tuple[np.ndarray, np.ndarray]:
    """Database and query descriptors: saved files where given, the rest through the server."""
    sides = _sets(config, benchmark)
    for side in sides:
        if side.saved is None:
            check_missing_images(side.images, side.noun, side.root_flag)
    values = {side.what: _read_saved(side) for side in sides if side.saved is not None}
    for side in sides:
        if side.what in values:
            check_dims(config.dims, values[side.what].shape[1], f"{side.flag} {side.saved}")
    todo = [side for side in sides if side.saved is None]
    if todo:
        assert config.client is not None  # config_from_args builds it when describing
        with NetVLADClient.from_config(config.client) as client:
            output_dims = client.info().output_dims
            check_dims(config.dims, output_dims, "the server's model")
            config.out.mkdir(parents=True, exist_ok=True)
            for side in todo:
                values[side.what] = _describe(client, config, side, output_dims, stderr)
    return values["database"], values["queries"]


def _check_before_work(config: RetrievalConfig, benchmark: Benchmark) -> None:
    """Refuse at once what would otherwise fail only after describing everything."""
    require("faiss", "the retrieval search")
    if config.plots:
        require("matplotlib", "drawing the figures (or pass --no-plots)")
        if config.examples:
            for side in _sets(config, benchmark):
                if side.saved is not None:
                    try:
                        check_missing_images(side.images, side.noun, side.root_flag)
                    except RetrievalError as exc:
                        raise RetrievalError(
                            f"{exc}, or pass --examples 0 to skip the example figure"
                        ) from None


def print_report(result: RetrievalResult, stdout: TextIO) -> None:
    """recall@N and the counts, one figure a line."""
    b = result.benchmark
    print(
        f"[{b.name}] {len(b.database.paths)} database images, {len(b.queries.paths)} queries, "
        f"{result.dims} dims, positives within {result.radius:g} m",
        file=stdout,
    )
    for n, r in result.recall_at.items():
        print(f"recall@{n}: {100 * r:.2f}%", file=stdout)
    print(
        f"queries without any database image within {result.radius:g} m: "
        f"{result.queries_without_positive}",
        file=stdout,
    )


def execute(
    config: RetrievalConfig, stdout: TextIO | None = None, stderr: TextIO | None = None
) -> dict[str, Any]:
    """Run one retrieval evaluation end to end; returns the summary it also writes."""
    stdout = stdout or sys.stdout
    stderr = stderr or sys.stderr
    benchmark = load_benchmark(config)
    _check_before_work(config, benchmark)
    database, queries = _descriptors(config, benchmark, stderr)
    result = evaluate_retrieval(
        benchmark, database, queries, dims=config.dims, radius=config.radius
    )
    print_report(result, stdout)
    out = config.out
    out.mkdir(parents=True, exist_ok=True)
    files = {
        "per_query_json": str(write_per_query_json(result, out / "per_query.json")),
        "per_query_csv": str(write_per_query_csv(result, out / "per_query.csv")),
    }
    if config.plots:
        files["recall_at_n"] = str(plot_recall_curve(result, out / "recall_at_n.png"))
        if config.examples:
            chosen = choose_examples(result, config.examples)
            files["examples"] = str(plot_examples(result, out / "examples.png", chosen))
    summary = {
        **result.summary(),
        "target": config.client.target if config.client else None,
        "files": files,
    }
    summary_path = write_summary(out, summary)
    print(f"wrote {', '.join([*files.values(), str(summary_path)])}", file=stderr)
    return summary


def run(args: argparse.Namespace) -> int:
    """Entry point of the subcommand: 0 on success, EXIT_ERROR with a one-line message."""
    return run_command("evaluate-retrieval", lambda: execute(config_from_args(args)))
