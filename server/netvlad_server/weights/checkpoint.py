"""Reading the netvlad_tf TF1 name-based checkpoint: from a prefix, its directory, or the zip."""

from __future__ import annotations

import math
import re
import shutil
import tempfile
import zipfile
from pathlib import Path, PurePosixPath

import numpy as np

from .schema import SCOPE, TENSOR_NAMES, WeightsError

OFFICIAL_NAME = "vd16_pitts30k_conv5_3_vlad_preL2_intra_white"
_SHARD = re.compile(r"\.data-(\d{5})-of-(\d{5})$")
_STATE_LINE = re.compile(r'^\s*model_checkpoint_path:\s*"(.*)"\s*$', re.MULTILINE)
_BOOKKEEPING = frozenset({"_CHECKPOINTABLE_OBJECT_GRAPH"})  # metadata some writers add


def strip_checkpoint_suffix(path: Path) -> Path | None:
    """The prefix if `path` names one checkpoint file (.index, .meta, .data-*), else None."""
    name = path.name
    for suffix in (".index", ".meta"):
        if name.endswith(suffix):
            return path.with_name(name.removesuffix(suffix))
    match = _SHARD.search(name)
    return path.with_name(name[: match.start()]) if match else None


def _name_all(prefixes: list[Path]) -> str:
    """A sorted, quoted list of checkpoint prefixes for error messages."""
    return ", ".join(repr(str(p)) for p in sorted(prefixes))


def _state_file_choice(directory: Path) -> str | None:
    """The checkpoint named by the directory's 'checkpoint' file (the last one saved), if any."""
    state = directory / "checkpoint"
    if not state.is_file():
        return None
    match = _STATE_LINE.search(state.read_text(errors="replace"))
    return Path(match.group(1)).name if match else None


def prefix_in_directory(directory: Path) -> Path:
    """The prefix of the one checkpoint in `directory` (as the official zip unpacks to)."""
    # The *.index files decide: the 'checkpoint' file often records an absolute path on the
    # machine that wrote it, which is stale once the directory is unpacked elsewhere.
    prefixes = sorted(index.with_suffix("") for index in directory.glob("*.index"))
    latest = _state_file_choice(directory)
    if len(prefixes) > 1:
        named = f"; its 'checkpoint' file names {latest!r} as the latest" if latest else ""
        raise WeightsError(
            f"{directory}: the directory holds {len(prefixes)} checkpoints ({_name_all(prefixes)})"
            f"{named}; pass the prefix of the one to use (the path without .index), e.g. "
            f"{str(prefixes[0])!r}"
        )
    if not prefixes:
        hint = (
            f"its 'checkpoint' file names {latest!r} but there is no {latest}.index"
            if latest
            else "no *.index file"
        )
        candidates = sorted(
            entry.name
            for entry in directory.iterdir()
            if entry.suffix in (".zip", ".mat", ".npz")
            or (entry.is_dir() and any(entry.glob("*.index")))
        )
        found = f"; it holds {', '.join(candidates[:5])}: pass one of those" if candidates else ""
        raise WeightsError(
            f"{directory}: the directory holds no TensorFlow checkpoint ({hint}){found}; expected "
            "a checkpoint prefix, a directory holding one, a .zip, a .mat or a .npz"
        )
    return prefixes[0]


def _check_data_files(prefix: Path, expected_bytes: int) -> None:
    """Refuse missing or truncated data shards before TensorFlow reads garbage from them."""
    shards = sorted(prefix.parent.glob(f"{prefix.name}.data-*-of-*"))
    totals = {int(m.group(2)) for p in shards if (m := _SHARD.search(p.name))}
    if len(totals) != 1 or len(shards) != next(iter(totals)):
        found = ", ".join(p.name for p in shards) or "none"
        raise WeightsError(
            f"{prefix}: checkpoint data file(s) missing (found: {found}); the index needs "
            f"{prefix.name}.data-00000-of-00001 (or every shard) next to {prefix.name}.index; "
            "unpack or download the checkpoint again"
        )
    size = sum(p.stat().st_size for p in shards)
    if size < expected_bytes:
        raise WeightsError(
            f"{prefix}: the checkpoint data is truncated: {size} bytes on disk, the index lists "
            f"{expected_bytes} bytes of tensors; the download or copy was cut short, fetch it again"
        )


def read_checkpoint(prefix: Path) -> dict[str, np.ndarray]:
    """Read every variable of a TF1 checkpoint, keyed without the vgg16_netvlad_pca/ scope."""
    try:
        import tensorflow as tf  # only this reader needs TensorFlow
    except ImportError as exc:
        raise WeightsError(
            f"{prefix}: reading a TensorFlow checkpoint needs TensorFlow, which is not installed; "
            "install the server extra (pip install 'netvlad-service[server]') or pass a .npz export"
        ) from exc

    index = Path(f"{prefix}.index")
    try:
        reader = tf.train.load_checkpoint(str(prefix))
    except (tf.errors.OpError, ValueError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise WeightsError(
            f"{index}: not a TensorFlow checkpoint index ({reason}); expected the .index file "
            "written by a TensorFlow Saver next to its .data-00000-of-00001 file"
        ) from exc
    shapes = reader.get_variable_to_shape_map()
    dtypes = reader.get_variable_to_dtype_map()
    order = {f"{SCOPE}/{name}": i for i, name in enumerate(TENSOR_NAMES)}
    names = sorted(
        (name for name in shapes if name not in _BOOKKEEPING),
        key=lambda name: (order.get(name, len(order)), name),
    )
    expected = sum(math.prod(shapes[n]) * dtypes[n].size for n in names if dtypes[n] != tf.string)
    _check_data_files(prefix, expected)
    tensors: dict[str, np.ndarray] = {}
    for name in names:
        try:
            value = reader.get_tensor(name)
        except (tf.errors.OpError, IndexError, ValueError) as exc:
            raise WeightsError(
                f"{prefix}: cannot read variable {name!r} from the checkpoint data ({exc}); "
                "the data file is damaged, fetch the checkpoint again"
            ) from exc
        key = name.removeprefix(f"{SCOPE}/")
        tensors[key] = np.asarray(value)
    return tensors


def read_checkpoint_zip(path: Path) -> dict[str, np.ndarray]:
    """Read the checkpoint inside a zip (the official download) via a temporary directory."""
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as exc:
        raise WeightsError(
            f"{path}: not a readable zip file ({exc}); the download may be incomplete, fetch it "
            "again"
        ) from exc
    with archive:
        members = [info for info in archive.infolist() if not info.is_dir()]
        if not members:
            raise WeightsError(
                f"{path}: the zip is empty; expected the official {OFFICIAL_NAME}.zip holding a "
                "TensorFlow checkpoint"
            )
        indexes = [info.filename for info in members if info.filename.endswith(".index")]
        if not indexes:
            shown = ", ".join(info.filename for info in members[:8])
            raise WeightsError(
                f"{path}: the zip holds no TensorFlow checkpoint (no .index file among: {shown}"
                f"{', ...' if len(members) > 8 else ''}); expected {OFFICIAL_NAME}.zip"
            )
        if len(indexes) > 1:
            raise WeightsError(
                f"{path}: the zip holds {len(indexes)} checkpoints ({', '.join(sorted(indexes))}); "
                "unpack it and pass the prefix of the one to use"
            )
        member_prefix = indexes[0].removesuffix(".index")
        wanted = [
            info
            for info in members
            if info.filename == indexes[0]
            or (
                info.filename.startswith(member_prefix)
                and _SHARD.fullmatch(info.filename[len(member_prefix) :])
            )
        ]
        # Flat names in our own directory: nothing in the zip decides where files are written.
        stem = PurePosixPath(member_prefix).name
        stem = stem if stem not in ("", ".", "..") else "checkpoint"
        with tempfile.TemporaryDirectory(prefix="netvlad-zip-") as temp:
            local_prefix = Path(temp) / stem
            for info in wanted:
                target = Path(f"{local_prefix}{info.filename[len(member_prefix) :]}")
                try:
                    with archive.open(info) as source, target.open("wb") as sink:
                        shutil.copyfileobj(source, sink, 1 << 24)
                except (zipfile.BadZipFile, EOFError, OSError) as exc:
                    raise WeightsError(
                        f"{path}: member {info.filename!r} is damaged ({exc}); the download may "
                        "be incomplete, fetch it again"
                    ) from exc
            try:
                return read_checkpoint(local_prefix)
            except WeightsError as exc:
                # Name the member, not the temporary directory that is about to disappear.
                message = str(exc).replace(str(local_prefix), member_prefix)
                raise WeightsError(f"{path}: {message}") from None
