"""Download of the official netvlad_tf checkpoint zip (docs/NETWORK.md), resumable and verified.

The download lands in ``<dest>/<name>.zip.part`` (kept across failures so a rerun resumes it with
an HTTP Range request), is checked as a zip (and against ``--sha256`` when given), unpacked into
a temporary directory inside ``dest``, loaded with ``load_weights`` to verify all 31 tensors, and
only then renamed into ``<dest>/<name>/``. Standard library only (urllib), so it runs anywhere.
"""

from __future__ import annotations

import argparse
import hashlib
import http.client
import re
import shutil
import sys
import tempfile
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, NoReturn, TextIO

from netvlad_client.options import Option, add_options
from netvlad_client.progress import Progress

OFFICIAL_NAME = "vd16_pitts30k_conv5_3_vlad_preL2_intra_white"
OFFICIAL_URL = f"http://rpg.ifi.uzh.ch/datasets/netvlad/{OFFICIAL_NAME}.zip"
CHUNK_BYTES = 1 << 20
_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")
_UNSATISFIED_RANGE = re.compile(r"bytes \*/(\d+)")


class FetchError(RuntimeError):
    """A download, verification or install step failed; the message says what to do next."""


class _Interrupted(Exception):
    """The transfer stopped before the end; the .part file holds what arrived."""


class _Restart(Exception):
    """The server cannot continue the .part file; it was deleted and the download starts over."""


@dataclass(frozen=True)
class FetchConfig:
    """Everything one fetch needs: where to put the model, where from, and how careful to be."""

    dest: Path = Path("models")
    url: str = OFFICIAL_URL
    force: bool = False
    sha256: str | None = None
    retries: int = 3
    timeout: float = 30.0

    @property
    def target(self) -> Path:
        """The directory the model ends up in."""
        return self.dest / OFFICIAL_NAME

    @property
    def part(self) -> Path:
        """The partial download, kept between runs for resuming."""
        return self.dest / f"{OFFICIAL_NAME}.zip.part"


def _no_network(cfg: FetchConfig, reason: object) -> FetchError:
    """The error for an unreachable host: how to get the file by hand instead."""
    host = urllib.parse.urlsplit(cfg.url).netloc or cfg.url
    kept = f"; the partial download is kept at {cfg.part} for resuming" if cfg.part.exists() else ""
    return FetchError(
        f"cannot reach {host} ({reason}); download it by hand from {cfg.url}, unzip it into "
        f"{cfg.dest}/ and run `netvlad-models inspect {cfg.target}`{kept}"
    )


def _open(cfg: FetchConfig, offset: int) -> http.client.HTTPResponse:
    """Send the GET (with a Range header when resuming); HTTP 416 comes back as a response."""
    headers = {"User-Agent": "netvlad-models-fetch"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    request = urllib.request.Request(cfg.url, headers=headers)
    try:
        return urllib.request.urlopen(request, timeout=cfg.timeout)
    except urllib.error.HTTPError as err:
        if err.code == 416 and offset:
            return err  # type: ignore[return-value]
        raise FetchError(
            f"{cfg.url} answered HTTP {err.code} {err.reason}; check the URL (--url) or "
            f"download the zip by hand and run `netvlad-models inspect` on it"
        ) from err
    except urllib.error.URLError as err:
        raise _no_network(cfg, err.reason) from err
    except (TimeoutError, ConnectionError) as err:
        raise _no_network(cfg, err) from err


def _resume_position(response: http.client.HTTPResponse, offset: int) -> tuple[int, int | None]:
    """Where this response's body starts in the file, and the file's total size if known.

    A 206 must carry a Content-Range starting exactly at ``offset``; a 200 is the whole file
    from byte 0 (the server ignored the Range header). Anything else means "start again".
    """
    length = response.headers.get("Content-Length")
    if response.status == 206:
        match = _CONTENT_RANGE.fullmatch(response.headers.get("Content-Range", "").strip())
        if match and int(match.group(1)) == offset:
            total = match.group(3)
            return offset, None if total == "*" else int(total)
        return -1, None
    if response.status == 200:
        return 0, int(length) if length is not None else None
    return -1, None


def _start_over(cfg: FetchConfig, offset: int, why: str, stream: TextIO) -> NoReturn:
    """Delete the .part file the server cannot continue; fail if nothing was there to resume."""
    if not offset:
        raise FetchError(f"{cfg.url}: {why}; cannot download from this server")
    stream.write(f"{why}; starting again from byte 0\n")
    cfg.part.unlink()
    raise _Restart()


def _download_once(cfg: FetchConfig, stream: TextIO) -> None:
    """Bring the .part file one attempt closer to complete; _Interrupted if it stopped short."""
    offset = cfg.part.stat().st_size if cfg.part.exists() else 0
    response = _open(cfg, offset)
    with response:
        content_range = response.headers.get("Content-Range")
        if response.status == 416:
            match = _UNSATISFIED_RANGE.fullmatch((content_range or "").strip())
            if match and int(match.group(1)) == offset:
                return  # the .part already holds the whole file
            _start_over(cfg, offset, f"the server refused to resume at byte {offset}", stream)
        start, total = _resume_position(response, offset)
        if start < 0:
            _start_over(
                cfg, offset,
                f"the server answered HTTP {response.status} with Content-Range {content_range!r} "
                f"to a request for bytes {offset}-", stream,
            )
        if offset and start == 0:
            stream.write("the server ignored the Range header; downloading from the start\n")
        progress = Progress(total, mode="bar" if stream.isatty() else "lines", stream=stream,
                            unit="bytes", label=f"downloading {OFFICIAL_NAME}.zip", start=start)
        with open(cfg.part, "r+b" if start else "wb") as out:
            out.seek(start)
            out.truncate()
            try:
                _copy(response, out, progress)
            finally:
                progress.close()
            size = out.tell()
    if total is not None and size != total:
        raise _Interrupted(f"connection closed at {size} of {total} bytes")


def _copy(response: BinaryIO, out: BinaryIO, progress: Progress) -> None:
    """Copy the body to the file chunk by chunk; network errors become _Interrupted."""
    while True:
        try:
            chunk = response.read(CHUNK_BYTES)
        except (OSError, http.client.HTTPException) as err:
            raise _Interrupted(str(err) or type(err).__name__) from err
        if not chunk:
            return
        out.write(chunk)
        progress.advance(len(chunk))


def download(cfg: FetchConfig, stream: TextIO = sys.stderr) -> Path:
    """Download (or finish downloading) the zip into the .part file, retrying interruptions."""
    cfg.dest.mkdir(parents=True, exist_ok=True)
    failures = 0
    while True:
        try:
            _download_once(cfg, stream)
            return cfg.part
        except _Restart:
            continue
        except _Interrupted as err:
            failures += 1
            if failures > cfg.retries:
                raise FetchError(
                    f"download of {cfg.url} interrupted ({err}) after {failures} attempt(s); "
                    f"the partial file is kept at {cfg.part}: run the same command again to "
                    f"resume it"
                ) from None
            stream.write(f"download interrupted ({err}); resuming ({failures}/{cfg.retries})\n")


def _sha256(path: Path) -> str:
    """Hex SHA-256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def _check_archive(cfg: FetchConfig) -> None:
    """Refuse a download whose checksum or zip structure is wrong."""
    if cfg.sha256:
        actual = _sha256(cfg.part)
        if actual != cfg.sha256.lower():
            raise FetchError(f"SHA-256 mismatch: expected {cfg.sha256.lower()}, got {actual}")
    try:
        with zipfile.ZipFile(cfg.part) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, OSError) as err:
        raise FetchError(f"the download is not a valid zip ({err})") from err
    if bad is not None:
        raise FetchError(f"the download is a damaged zip (CRC error in {bad})")


def _find_checkpoint_dir(root: Path) -> Path:
    """The unpacked directory holding the checkpoint (the zip's top folder, or the root itself)."""
    expected = root / OFFICIAL_NAME
    if expected.is_dir():
        return expected
    holders = sorted({p.parent for p in root.rglob("*.index")})
    if len(holders) != 1:
        raise FetchError(
            f"the zip should unpack to a folder {OFFICIAL_NAME}/ holding one checkpoint; "
            f"found checkpoint index files in {len(holders)} folders"
        )
    return holders[0]


def _verify_and_install(cfg: FetchConfig, stream: TextIO) -> Path:
    """Unpack into a temporary folder in dest, load all tensors, then move into place atomically."""
    from netvlad_server.weights import WeightsError, load_weights

    staging = Path(tempfile.mkdtemp(prefix=".fetch-", dir=cfg.dest))
    try:
        stream.write(f"unpacking into {staging}\n")
        with zipfile.ZipFile(cfg.part) as archive:
            archive.extractall(staging / "unpacked")
        unpacked = _find_checkpoint_dir(staging / "unpacked")
        try:
            weights = load_weights(unpacked)
        except (WeightsError, OSError, ValueError) as err:
            problems = str(err).replace(str(unpacked), f"{OFFICIAL_NAME}/ from {cfg.url}")
            raise FetchError(
                f"the unpacked checkpoint does not hold valid NetVLAD weights: {problems}"
            ) from err
        stream.write(
            f"verified {len(weights.tensors)} tensors, {weights.output_dims}-D output, "
            f"{weights.parameter_count:,} parameters\n"
        )
        old = staging / "replaced"
        if cfg.target.exists():
            cfg.target.rename(old)
        try:
            unpacked.rename(cfg.target)
        except OSError:
            if old.exists():
                old.rename(cfg.target)
            raise
        return cfg.target
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def fetch(cfg: FetchConfig, stream: TextIO = sys.stderr) -> Path:
    """Download, verify and install the official model; return the installed directory."""
    if cfg.target.exists() and not cfg.force:
        raise FetchError(
            f"{cfg.target} already exists; use it with `netvlad-server --model {cfg.target}`, "
            f"or pass --force to download and replace it"
        )
    download(cfg, stream)
    try:
        _check_archive(cfg)
        target = _verify_and_install(cfg, stream)
    except FetchError as err:
        cfg.part.unlink(missing_ok=True)
        raise FetchError(f"{err}; the download was deleted and nothing was installed") from None
    except OSError as err:
        raise FetchError(
            f"could not unpack into {cfg.dest} ({err}); nothing was installed and the download "
            f"is kept at {cfg.part}: fix the cause and run the same command again to reuse it"
        ) from err
    cfg.part.unlink()
    stream.write(f"installed {target}\n")
    return target


def _sha256_hex(text: str) -> str:
    """--sha256: 64 hex digits, checked before a byte is downloaded."""
    if not re.fullmatch(r"[0-9a-fA-F]{64}", text.strip()):
        raise ValueError(f"expected 64 hexadecimal digits (a SHA-256), got {text!r}")
    return text.strip()


_DEFAULT = FetchConfig()
FETCH_OPTIONS: tuple[Option, ...] = (
    Option(("--dest",), "folder that receives the model", default=_DEFAULT.dest, convert=Path,
           env="NETVLAD_MODELS_DIR", shown_default="models/"),
    Option(("--url",), "where to download the zip from, e.g. a mirror", default=_DEFAULT.url,
           env="NETVLAD_WEIGHTS_URL"),
    Option(("--force",), "replace an installed model", default=_DEFAULT.force, kind="switch"),
    Option(("--sha256",), "expected SHA-256 of the zip (64 hex digits), checked before "
           "unpacking", convert=_sha256_hex),
    Option(("--retries",), "resume attempts after an interruption", default=_DEFAULT.retries,
           convert=int),
    Option(("--timeout",), "seconds without data before giving up", default=_DEFAULT.timeout,
           convert=float),
)


def register_fetch(subparsers: argparse._SubParsersAction) -> None:
    """Add `fetch [--dest models/] [--url URL]` to `netvlad-models`."""
    parser = subparsers.add_parser(
        "fetch",
        help="download, verify and unpack the official netvlad_tf checkpoint into models/",
        description="Download the official checkpoint zip (about 1.1 GB, resumable), verify "
        "all 31 tensors and unpack it to DEST/" + OFFICIAL_NAME + "/.",
    )
    add_options(parser, FETCH_OPTIONS)
    parser.set_defaults(handler=run_fetch)


def run_fetch(args: argparse.Namespace) -> int:
    """Entry point of `netvlad-models fetch`: 0 when installed, 1 with a message otherwise."""
    cfg = FetchConfig(
        dest=args.dest, url=args.url, force=args.force, sha256=args.sha256,
        retries=args.retries, timeout=args.timeout,
    )
    try:
        fetch(cfg)
    except FetchError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0
