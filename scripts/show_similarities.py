"""Print the shape of a descriptor file written by `netvlad-client describe --out X.npz` and the
cosine similarities between all its rows."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np


def main(path: str) -> None:
    data = np.load(path)
    descriptors, names = data["descriptors"], [Path(str(n)).name for n in data["names"]]
    print(f"descriptors: shape {descriptors.shape}, dtype {descriptors.dtype}, "
          f"norms {np.round(np.linalg.norm(descriptors, axis=1), 4).tolist()}")
    similarity = descriptors @ descriptors.T
    width = max(len(n) for n in names)
    print("cosine similarity:")
    print(" " * (width + 2) + "  ".join(f"{i:>6d}" for i in range(len(names))))
    for i, name in enumerate(names):
        row = "  ".join(f"{v:6.3f}" for v in similarity[i])
        print(f"{i} {name:<{width}} {row}")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: show_similarities.py DESCRIPTORS.npz")
    main(sys.argv[1])
