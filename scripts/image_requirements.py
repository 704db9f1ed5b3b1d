"""Print the container image's pip requirements for one variant, read from pyproject.toml.

The `server` extra pins the CPU build of TensorFlow; the GPU image must not install it beside
the CUDA build (both own the `tensorflow` package), so the GPU variant swaps those lines for the
`gpu` extra; the CPU variant adds the `int8` extra (LiteRT). Keeping pyproject.toml the only
list of dependencies stops the image drifting. Needs Python 3.11+ (tomllib), as the image and
CI have.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import tomllib

VARIANTS = ("gpu", "cpu")
_TENSORFLOW = {"tensorflow", "tensorflow-cpu"}


def _name(requirement: str) -> str:
    """The distribution name a requirement string starts with, normalised."""
    match = re.match(r"[A-Za-z0-9._-]+", requirement.strip())
    if match is None:
        raise ValueError(f"cannot read a package name from requirement {requirement!r}")
    return re.sub(r"[._]+", "-", match.group()).lower()


def requirements(pyproject: Path, variant: str) -> list[str]:
    """Base + server requirements: TensorFlow's CUDA build for gpu, LiteRT added for cpu."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown image variant {variant!r}; expected one of {VARIANTS}")
    project = tomllib.loads(pyproject.read_text())["project"]
    extras = project["optional-dependencies"]
    server = extras["server"]
    if variant == "gpu":
        server = [r for r in server if _name(r) not in _TENSORFLOW] + extras["gpu"]
    else:  # int8 (LiteRT) is a CPU precision: only the CPU image carries it
        server = [*server, *extras["int8"]]
    return [*project["dependencies"], *server]


def main() -> None:
    """Command line: image_requirements.py gpu|cpu [--pyproject PATH]."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("variant", choices=VARIANTS)
    parser.add_argument("--pyproject", type=Path, default=Path("pyproject.toml"))
    args = parser.parse_args()
    print("\n".join(requirements(args.pyproject, args.variant)))


if __name__ == "__main__":
    main()
