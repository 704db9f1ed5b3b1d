"""One entry point for every weight source: it looks at the path and calls the matching reader."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .checkpoint import (
    prefix_in_directory,
    read_checkpoint,
    read_checkpoint_zip,
    strip_checkpoint_suffix,
)
from .demo import demo_weights
from .export import read_export
from .matconvnet import read_matconvnet
from .schema import NetVLADWeights, WeightsError

ACCEPTED = (
    "expected a checkpoint prefix, a directory holding one, a .zip, a .mat or a .npz "
    "(or 'demo' / 'demo-tiny' for meaningless random weights)"
)
DEMO_SOURCES = {"demo": "full", "demo-full": "full", "demo-tiny": "tiny", "tiny-demo": "tiny"}


def _build(
    tensors: dict[str, np.ndarray], source: str, fmt: str, label: str = ""
) -> NetVLADWeights:
    """Validate the tensors read from `source`, naming the file in any error."""
    try:
        return NetVLADWeights(tensors=tensors, source=source, format=fmt, label=label)
    except WeightsError as exc:
        raise WeightsError(f"{source} ({fmt}): {exc}") from None


def _checkpoint_prefix(given: Path) -> Path | None:
    """The TF1 checkpoint prefix `given` designates (directory, prefix or member file), if any."""
    if given.is_dir():
        return prefix_in_directory(given)
    if Path(f"{given}.index").is_file():
        return given
    if not given.is_file():
        return None
    if given.name == "checkpoint":
        return prefix_in_directory(given.parent)
    return strip_checkpoint_suffix(given)


def load_weights(path: str | os.PathLike) -> NetVLADWeights:
    """Load weights from a TF1 checkpoint (prefix, directory or zip), a .mat, a .npz or 'demo'."""
    text = os.fspath(path)
    if text in DEMO_SOURCES:
        return demo_weights(DEMO_SOURCES[text])
    given = Path(text).expanduser()
    suffix = given.suffix.lower() if given.is_file() else ""
    if suffix == ".npz":
        tensors, label = read_export(given)
        return _build(tensors, text, "npz", label)
    if suffix == ".mat":
        tensors, _ = read_matconvnet(given)
        return _build(tensors, text, "matconvnet")
    if suffix == ".zip":
        return _build(read_checkpoint_zip(given), text, "tf1-checkpoint")
    prefix = _checkpoint_prefix(given)
    if prefix is not None:
        return _build(read_checkpoint(prefix), text, "tf1-checkpoint")
    if not given.exists():
        raise WeightsError(f"{text}: no such file, directory or checkpoint prefix; {ACCEPTED}")
    shown = suffix or given.suffix or "none"
    raise WeightsError(f"{text}: unrecognised weight file (extension {shown!r}); {ACCEPTED}")
