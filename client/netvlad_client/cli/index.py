"""`netvlad-client index`: the server's place indexes from the command line.

`create`, `list`, `add`, `query`, `remove`, `export`, `import` and `drop`. Every call goes to
one server: `--index-target` when given (the index server of a deployment whose describing
replicas keep no indexes, docs/PLACES.md), else `--target`. `add` describes its images through
the bulk describing path that `describe` uses (progress bar, concurrency, `--resume`
checkpoint, `--on-error skip`) on that same server, then adds the descriptors with the
server's weights fingerprint, so a server restarted with other weights refuses them.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from pathlib import Path
from typing import Any

from netvlad_client import NetVLADClient, NetVLADInputError
from netvlad_client.cli.bulk import BulkSettings, checkpoint_for, describe_rows, on_error_option
from netvlad_client.cli.common import (
    client_config,
    concurrency_option,
    image_files,
    progress_option,
    resize_setting,
    say,
)
from netvlad_client.evaluation import EvaluationError, name_time_ns
from netvlad_client.options import (
    Option,
    add_options,
    choice,
    int_range,
    non_negative_float,
    positive_int,
)
from netvlad_client.places import ADD_BATCH, METHODS, Match, Place, PlaceArrays
from netvlad_client.progress import Progress, choose_mode
from netvlad_client.rowstore import RowFile

ID_SOURCES = ("path", "name", "stem")
TIMESTAMP_SOURCES = ("none", "name")
METHOD_CHOICES = tuple(METHODS)
ADD_REQUEST_BYTES = 2 << 20  # descriptor bytes per AddPlaces request, well within gRPC's 4 MiB

INDEX_OPTIONS: tuple[Option, ...] = (
    Option(("--index-target",), "the server that keeps the place indexes, when it is not "
           "--target (a deployment's index server, docs/PLACES.md); same forms as --target",
           env="NETVLAD_INDEX_TARGET", shown_default="--target"),
)

CREATE_OPTIONS: tuple[Option, ...] = (
    Option(("--dims",), "descriptor length: the first N whitened dimensions, re-normalised",
           convert=int_range(1), shown_default="the server's default"),
    Option(("--method",), "exact (what brute force returns) or hnsw (approximate, for large "
           "maps)", default="exact", convert=choice(METHOD_CHOICES), choices=METHOD_CHOICES),
    Option(("--exist-ok",), "an existing index of the same dims and method is not an error",
           default=False, kind="switch"),
)

LIST_OPTIONS: tuple[Option, ...] = (
    Option(("--json",), "print JSON instead of a table", default=False, kind="switch"),
)

ADD_OPTIONS: tuple[Option, ...] = (
    Option(("--id",), "each place's id: the image's path as given or found (path), its file "
           "name (name) or the file name without extension (stem)", default="path",
           convert=choice(ID_SOURCES), choices=ID_SOURCES, dest="id_source"),
    Option(("--timestamps",), "none, or name: read each image's timestamp from its file name "
           "(seconds such as 1305031102.175304.png, or nanoseconds such as "
           "1403636579763555584.png)", default="none", convert=choice(TIMESTAMP_SOURCES),
           choices=TIMESTAMP_SOURCES),
    Option(("--metadata",), "KEY=VALUE[,KEY=VALUE...] stored with every place of this run"),
    Option(("--resize",), "'keep', or N (or fit:N) to fit the longest side to N px",
           convert=resize_setting, shown_default="the server's policy"),
    Option(("--batch-size",), "images per describing request", convert=positive_int,
           shown_default="the server's max batch size"),
    concurrency_option("describing requests in flight at once"),
    Option(("--resume",), "keep described images in NAME.index-add.partial/ (in --work-dir) "
           "and reuse them when run again after an interruption", default=False, kind="switch"),
    Option(("--work-dir",), "where --resume keeps its checkpoint", default="."),
    Option(("--recursive", "-r"), "also take images from sub-folders", default=False,
           kind="switch"),
    on_error_option(),
    progress_option("progress bar on stderr (auto: on a terminal, for many files)"),
)

QUERY_OPTIONS: tuple[Option, ...] = (
    Option(("-k", "--k"), "most matches to show", default=10, convert=positive_int),
    Option(("--min-similarity",), "leave out matches below this cosine similarity",
           convert=float),
    Option(("--timestamp",), "the query's timestamp in seconds (for --exclude-within-seconds)",
           convert=float),
    Option(("--exclude-within-seconds",), "skip places whose timestamp lies within this many "
           "seconds of --timestamp", default=0.0, convert=non_negative_float),
    Option(("--exclude-last",), "skip the N places added most recently", default=0,
           convert=int_range(0)),
    Option(("--resize",), "'keep', or N (or fit:N) to fit the longest side to N px",
           convert=resize_setting, shown_default="the server's policy"),
    Option(("--json",), "print JSON lines (one match each) instead of a table", default=False,
           kind="switch"),
)

IMPORT_OPTIONS: tuple[Option, ...] = (
    Option(("--create",), "create the index first (dims from the file, exact search) when it "
           "does not exist", default=False, kind="switch"),
)

DROP_OPTIONS: tuple[Option, ...] = (
    Option(("--yes",), "really delete the index and all its places (required)", default=False,
           kind="switch"),
)


def register(subparsers: Any) -> None:
    """Add `index create|list|add|query|remove|export|import|drop`."""
    parser = subparsers.add_parser(
        "index", help="manage the server's place indexes: create, add, query, export...",
        description="Place indexes on the server: named sets of places searched by descriptor "
                    "similarity (docs/PLACES.md).",
    )
    actions = parser.add_subparsers(dest="index_command", required=True, metavar="ACTION")

    def action(name: str, help_text: str, options: tuple[Option, ...], run: Any) -> Any:
        sub = actions.add_parser(name, help=help_text, description=help_text + ".")
        sub.add_argument("index", metavar="NAME", help="the index's name")
        add_options(sub, (*INDEX_OPTIONS, *options))
        sub.set_defaults(func=run)
        return sub

    action("create", "create an empty index for the server's model", CREATE_OPTIONS, run_create)
    listing = actions.add_parser("list", help="list the indexes (name, places, dims, memory)",
                                 description="List the server's indexes and their sizes.")
    add_options(listing, (*INDEX_OPTIONS, *LIST_OPTIONS))
    listing.set_defaults(func=run_list)
    add = action("add", "describe images and folders and add them as places", ADD_OPTIONS,
                 run_add)
    add.add_argument("images", nargs="+", metavar="IMG|DIR", help="image files and folders")
    query = action("query", "the places most similar to an image, best first", QUERY_OPTIONS,
                   run_query)
    query.add_argument("image", metavar="IMG", help="the query image")
    remove = action("remove", "remove places by id", (), run_remove)
    remove.add_argument("ids", nargs="+", metavar="ID", help="ids of the places to remove")
    export = action("export", "write every place (ids, descriptors, timestamps, positions, "
                    "metadata) to a .npz file", (), run_export)
    export.add_argument("out", metavar="OUT.npz", help="the file to write")
    imported = action("import", "add the places of a .npz file written by export",
                      IMPORT_OPTIONS, run_import)
    imported.add_argument("file", metavar="FILE.npz", help="the file to read")
    action("drop", "delete the index and all its places", DROP_OPTIONS, run_drop)


def index_client(args: argparse.Namespace, priority: str | None = None) -> NetVLADClient:
    """A client of the index server: --index-target when given, else --target."""
    config = client_config(args, priority)
    if args.index_target:
        config = dataclasses.replace(config, target=args.index_target)
    return NetVLADClient.from_config(config)


def _size(count: int) -> str:
    """Bytes for people."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if count < 1024 or unit == "GiB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    return ""


def run_create(args: argparse.Namespace) -> int:
    """Create the index and say what it is."""
    with index_client(args) as client:
        info = client.create_index(args.index, args.dims, method=args.method,
                                   exist_ok=args.exist_ok)
    say(f"index {info.name}: {info.size} places, {info.dims} dims, {info.method} search, "
        f"model {info.model_name or info.weights_sha256[:16]} ({info.precision})")
    return 0


def run_list(args: argparse.Namespace) -> int:
    """Print every index as a table or JSON."""
    with index_client(args) as client:
        indexes = client.list_indexes()
    if args.json:
        print(json.dumps([dataclasses.asdict(info) for info in indexes], indent=1))
        return 0
    if not indexes:
        say("no indexes on this server (create one with `netvlad-client index create NAME`)")
        return 0
    print(f"{'NAME':24} {'PLACES':>9} {'DIMS':>5} {'METHOD':6} {'MEMORY':>10}  MODEL")
    for info in indexes:
        model = f"{info.model_name or '?'} {info.precision} {info.weights_sha256[:12]}"
        if info.error:
            model = f"NOT LOADED: {info.error}"
        print(f"{info.name:24} {info.size:9d} {info.dims:5d} {info.method:6} "
              f"{_size(info.bytes):>10}  {model}")
    return 0


def parse_metadata(text: str | None) -> dict[str, str]:
    """--metadata KEY=VALUE[,KEY=VALUE...] as a dict."""
    metadata: dict[str, str] = {}
    for item in (text or "").split(","):
        if not item.strip():
            continue
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise NetVLADInputError(f"--metadata {text!r}: write KEY=VALUE pairs separated by "
                                    f"commas (the pair {item!r} has no KEY=)")
        metadata[key.strip()] = value.strip()
    return metadata


def place_ids(names: list[str], source: str) -> list[str]:
    """Each image's place id (--id); two images may not end with the same id."""
    if source == "name":
        ids = [Path(name).name for name in names]
    elif source == "stem":
        ids = [Path(name).stem for name in names]
    else:
        ids = list(names)
    seen: dict[str, str] = {}
    for name, place_id in zip(names, ids, strict=True):
        if place_id in seen and seen[place_id] != name:
            raise NetVLADInputError(f"--id {source}: {seen[place_id]} and {name} both get the "
                                    f"id {place_id!r}; use --id path")
        seen[place_id] = name
    return ids


def timestamps_of(names: list[str], source: str) -> list[float | None]:
    """Each image's timestamp in seconds (--timestamps), or None."""
    if source == "none":
        return [None] * len(names)
    try:
        return [name_time_ns(name) / 1e9 for name in names]
    except EvaluationError as exc:
        raise NetVLADInputError(f"--timestamps name: {exc}") from None


def add_batch(limit: int, dims: int) -> int:
    """Places per AddPlaces request: the server's limit, and about 2 MiB of descriptors."""
    return max(1, min(limit or ADD_BATCH, ADD_REQUEST_BYTES // (4 * dims)))


def run_add(args: argparse.Namespace) -> int:
    """Describe the images (resumable), then add them as places; the exit status."""
    files = image_files(args.images, recursive=args.recursive)
    names = list(dict.fromkeys(str(path) for path in files))
    ids = place_ids(names, args.id_source)
    stamps = timestamps_of(names, args.timestamps)
    metadata = parse_metadata(args.metadata)
    folder = any(Path(item).is_dir() for item in args.images)
    with index_client(args, "bulk" if folder else None) as client:
        index = next((i for i in client.list_indexes() if i.name == args.index), None)
        if index is None:
            raise NetVLADInputError(f"no index named {args.index!r} on {client.config.target}; "
                                    f"create it first: netvlad-client index create {args.index}")
        info = client.info()
        limits = client.place_limits()
        fingerprint = limits.server_model.weights_sha256
        per_request = add_batch(limits.limits.max_places_per_request, index.dims)
        checkpoint = None
        if args.resume:
            work = Path(args.work_dir)
            if not work.is_dir():
                raise NetVLADInputError(f"--work-dir {work} is not a directory")
            checkpoint = checkpoint_for(work / f"{args.index}.index-add", info, index.dims,
                                        args.resize)
        rows = RowFile(names, index.dims)
        settings = BulkSettings(batch_size=args.batch_size, concurrency=args.concurrency,
                                resize=args.resize, progress=args.progress,
                                resume_hint="pass --resume to keep described images across runs",
                                on_error=args.on_error)
        try:
            stopped = describe_rows(client, info, rows, settings, checkpoint)
            if stopped is not None:
                return stopped
            kept = [i for i, name in enumerate(names) if name not in rows.skipped]
            places = [Place(ids[i], descriptor=rows.rows[rows.index(names[i])],
                            timestamp=stamps[i], metadata=metadata) for i in kept]
            progress = Progress(len(places), mode=choose_mode(args.progress, sys.stderr,
                                                              len(places) > per_request),
                                unit="places", label="adding")
            replaced = 0
            size = index.size
            try:
                for start in range(0, len(places), per_request):
                    batch = places[start:start + per_request]
                    result = client.add_places(args.index, batch, batch_size=per_request,
                                               weights_sha256=fingerprint)
                    replaced += len(result.replaced)
                    size = result.size
                    progress.advance(len(batch))
            finally:
                progress.close()
            if checkpoint is not None:
                checkpoint.remove()
        finally:
            rows.discard()
    text = f"added {len(places)} places to {args.index} ({size} places now)"
    if replaced:
        text += f"; {replaced} replaced an earlier place of the same id"
    if rows.skipped:
        text += f"; skipped {len(rows.skipped)} images: " + "; ".join(
            f"{name}: {why}" for name, why in list(rows.skipped.items())[:5])
    say(text)
    return 0


def match_row(match: Match) -> dict[str, Any]:
    """A match as JSON (no NaN: a missing timestamp or position is null)."""
    stamp = match.timestamp
    return {"id": match.id, "similarity": round(match.similarity, 6),
            "timestamp": None if stamp is None or math.isnan(stamp) else stamp,
            "position": list(match.position) if match.position is not None else None,
            "metadata": match.metadata}


def run_query(args: argparse.Namespace) -> int:
    """Print the matches of one image, best first."""
    path = Path(args.image)
    if not path.is_file():
        raise NetVLADInputError(f"query image {path} not found")
    if args.exclude_within_seconds and args.timestamp is None:
        raise NetVLADInputError("--exclude-within-seconds needs the query's --timestamp")
    with index_client(args, "interactive") as client:
        matches = client.query_places(
            args.index, str(path), k=args.k, min_similarity=args.min_similarity,
            timestamp=args.timestamp, exclude_within_seconds=args.exclude_within_seconds,
            exclude_last=args.exclude_last, resize=args.resize)
    if args.json:
        for match in matches:
            print(json.dumps(match_row(match)))
        return 0
    if not matches:
        say(f"no match in {args.index} (empty index, or everything excluded or below "
            "--min-similarity)")
        return 0
    print(f"{'RANK':>4}  {'SIMILARITY':>10}  {'TIMESTAMP':>18}  ID")
    for rank, match in enumerate(matches, 1):
        row = match_row(match)
        stamp = "" if row["timestamp"] is None else f"{row['timestamp']:.6f}"
        print(f"{rank:4d}  {match.similarity:10.4f}  {stamp:>18}  {match.id}")
    return 0


def run_remove(args: argparse.Namespace) -> int:
    """Remove places by id."""
    with index_client(args) as client:
        removed, missing = client.remove_places(args.index, args.ids)
    text = f"removed {removed} places from {args.index}"
    if missing:
        text += f"; not in the index: {', '.join(missing[:10])}"
        text += f" and {len(missing) - 10} more" if len(missing) > 10 else ""
    say(text)
    return 0


def run_export(args: argparse.Namespace) -> int:
    """Write the index to a .npz (numpy and `evaluate --descriptors` read it)."""
    out = Path(args.out)
    if out.suffix.lower() != ".npz":
        raise NetVLADInputError(f"export writes a .npz file; name it {out.with_suffix('.npz')}")
    if not out.parent.is_dir():
        raise NetVLADInputError(f"the output directory {out.parent} does not exist")
    with index_client(args) as client:
        count = client.export_npz(args.index, out)
    say(f"wrote {count} places of {args.index} to {out}")
    return 0


def run_import(args: argparse.Namespace) -> int:
    """Add the places of an exported .npz (refused when another model made them)."""
    arrays = PlaceArrays.load_npz(args.file)
    if arrays.descriptors.ndim != 2 or not len(arrays.ids):
        raise NetVLADInputError(f"{args.file} holds no places")
    with index_client(args) as client:
        per_request = add_batch(client.place_limits().limits.max_places_per_request,
                                int(arrays.descriptors.shape[1]))
        if args.create:
            client.create_index(args.index, int(arrays.descriptors.shape[1]), exist_ok=True)
        elif args.index not in {info.name for info in client.list_indexes()}:
            raise NetVLADInputError(f"no index named {args.index!r} on {client.config.target}; "
                                    "create it (index create) or pass --create")
        result = client.add_places(args.index, arrays.places(), batch_size=per_request,
                                   weights_sha256=arrays.weights_sha256)
    say(f"imported {result.added} places into {args.index} ({result.size} places now"
        + (f"; {len(result.replaced)} replaced)" if result.replaced else ")"))
    return 0


def run_drop(args: argparse.Namespace) -> int:
    """Delete the index, only with --yes."""
    if not args.yes:
        raise NetVLADInputError(f"dropping deletes {args.index} and all its places for good; "
                                "pass --yes to do it (an `index export` first keeps a copy)")
    with index_client(args) as client:
        places = client.drop_index(args.index)
    say(f"dropped {args.index} ({places} places)")
    return 0
