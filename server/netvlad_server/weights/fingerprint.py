"""One fingerprint of a set of weights: which model made a descriptor, independent of the file.

The same tensors give the same fingerprint whether they came from the TF1 checkpoint, the .mat
or an exported .npz, so a place index made from one file keeps working with another file of
the same model, and refuses descriptors of any other model.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping

import numpy as np

_CHUNK = 64 * 1024 * 1024  # hash large tensors in slices: no second copy of a 0.5 GB tensor


def weights_fingerprint(tensors: Mapping[str, np.ndarray]) -> str:
    """sha256 (hex) over every tensor's name, dtype, shape and little-endian bytes, by name.

    About a second for the full 0.6 GB model, computed once when the server loads its weights.
    """
    digest = hashlib.sha256()
    for name in sorted(tensors):
        array = np.ascontiguousarray(tensors[name])
        array = array.astype(array.dtype.newbyteorder("<"), copy=False)
        digest.update(f"{name}\0{array.dtype.str}\0{array.shape}\0".encode())
        flat = array.reshape(-1).view(np.uint8)
        for start in range(0, flat.size, _CHUNK):
            digest.update(flat[start:start + _CHUNK].data)
    return digest.hexdigest()
