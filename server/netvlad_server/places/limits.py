"""Names, defaults, limits and the checks of place-index requests, with their error messages.

Every refusal is a PlaceError carrying the gRPC status code and a message that names what is
wrong and what to do; the servicer turns it into the call's status.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass

import grpc

# Descriptor length of a new index that asks for none: 256 whitened dimensions kept the recall of
# all 4096 on the measured sequence (128 lost some) at 1/16 of the memory and search time
# (docs/BENCHMARKS.md#place-indexes).
DEFAULT_INDEX_DIMS = 256
MAX_K = 1000  # most matches one query may ask for
NAME_PATTERN = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}")
MAX_ID_BYTES = 1024
METHODS = ("exact", "hnsw")


class PlaceError(Exception):
    """A place-index request refused with a gRPC status code and a message for the caller."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def invalid(message: str) -> PlaceError:
    """An INVALID_ARGUMENT refusal."""
    return PlaceError(grpc.StatusCode.INVALID_ARGUMENT, message)


@dataclass(frozen=True)
class PlaceLimits:
    """The server's place-index limits (from the --max-* flags)."""

    max_indexes: int
    max_places_per_request: int
    max_metadata_bytes: int
    max_total_bytes: int
    max_k: int = MAX_K


@dataclass(frozen=True)
class ModelIdentity:
    """Which weights, precision and output length made an index's descriptors."""

    weights_sha256: str
    precision: str
    output_dims: int
    model_name: str = ""

    def same_model(self, other: ModelIdentity) -> bool:
        """True when descriptors of `other` may be mixed with this one's (the name aside)."""
        return (self.weights_sha256, self.precision, self.output_dims) == (
            other.weights_sha256, other.precision, other.output_dims)

    def __str__(self) -> str:
        name = f"{self.model_name}, " if self.model_name else ""
        return (f"{name}weights sha256 {self.weights_sha256[:16]}, {self.precision}, "
                f"{self.output_dims} dims")


def check_name(name: str) -> str:
    """An index name usable as a directory name: refuse anything else."""
    if not NAME_PATTERN.fullmatch(name):
        raise invalid(f"index name {name!r} is not valid: use 1 to 64 letters, digits, '_', '-' "
                      "or '.', not starting with '.' or '-'")
    return name


def check_k(k: int, limits: PlaceLimits) -> int:
    """k must be 1..max_k."""
    if k == 0:
        raise invalid("options.k is 0: ask for at least 1 match")
    if k > limits.max_k:
        raise invalid(f"options.k {k} exceeds the limit of {limits.max_k} matches per query; "
                      "ask for fewer")
    return k


def check_id(place_id: str, where: str) -> str:
    """A place id: not empty, at most MAX_ID_BYTES."""
    if not place_id:
        raise invalid(f"{where}: the place id is empty; give every place a non-empty id")
    if len(place_id.encode()) > MAX_ID_BYTES:
        raise invalid(f"{where}: the place id is {len(place_id.encode())} bytes; the limit is "
                      f"{MAX_ID_BYTES}")
    return place_id


def check_metadata(metadata: Mapping[str, str], where: str, limits: PlaceLimits) -> dict:
    """Metadata within --max-place-metadata-bytes (keys plus values in UTF-8)."""
    size = sum(len(key.encode()) + len(value.encode()) for key, value in metadata.items())
    if size > limits.max_metadata_bytes:
        raise invalid(f"{where}: metadata of {size} bytes exceeds the limit of "
                      f"{limits.max_metadata_bytes} bytes per place (--max-place-metadata-bytes)"
                      "; keep large data elsewhere and store a reference")
    return dict(metadata)


def check_finite(value: float, what: str, where: str) -> float:
    """Timestamps and positions must be finite numbers."""
    if not math.isfinite(value):
        raise invalid(f"{where}: {what} is {value}; give a finite number or leave it unset")
    return value
