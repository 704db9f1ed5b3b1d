"""Test helpers writing a weights dict in the formats users have: TF1 checkpoint, zip, .mat.

Also `write_stats`: one image's layer outputs as MATLAB's vl_simplenn saves them (compare-layers).
"""

from __future__ import annotations

import shutil
import tempfile
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import scipy.io
from netvlad_server.layercheck import to_matconvnet
from netvlad_server.weights import CONV_LAYERS, POOL_AFTER, SCOPE

OFFICIAL_NAME = "vd16_pitts30k_conv5_3_vlad_preL2_intra_white"


def write_tf1_checkpoint(
    tensors: Mapping[str, np.ndarray], prefix: str | Path, scope: str = SCOPE
) -> Path:
    """Save `tensors` as TF1 variables `<scope>/<name>` with a tf.compat.v1 Saver; return prefix.

    Writes `checkpoint`, `<prefix>.index`, `<prefix>.data-00000-of-00001` and `<prefix>.meta`.
    Values are fed through placeholders so the .meta graph stays small at full size.
    """
    import tensorflow as tf

    prefix = Path(prefix).absolute()
    prefix.parent.mkdir(parents=True, exist_ok=True)
    graph = tf.Graph()
    with graph.as_default():
        variables, feeds, assigns = {}, {}, []
        for name, value in tensors.items():
            value = np.asarray(value)
            full_name = f"{scope}/{name}" if scope else name
            dtype = tf.as_dtype(value.dtype)
            variable = tf.compat.v1.get_variable(
                full_name, shape=value.shape, dtype=dtype, initializer=tf.zeros_initializer()
            )
            placeholder = tf.compat.v1.placeholder(dtype, value.shape)
            assigns.append(variable.assign(placeholder))
            feeds[placeholder] = value
            variables[full_name] = variable
        saver = tf.compat.v1.train.Saver(var_list=variables)
        with tf.compat.v1.Session(graph=graph) as session:
            session.run(assigns, feed_dict=feeds)
            saver.save(session, str(prefix))
    return prefix


def write_official_dir(tensors: Mapping[str, np.ndarray], parent: str | Path) -> Path:
    """Write the directory the official zip unpacks to, inside `parent`; return the directory."""
    directory = Path(parent) / OFFICIAL_NAME
    write_tf1_checkpoint(tensors, directory / OFFICIAL_NAME)
    return directory


def write_official_zip(
    tensors: Mapping[str, np.ndarray],
    zip_path: str | Path,
    compression: int = zipfile.ZIP_STORED,
) -> Path:
    """Write a zip laid out like the official download: one top-level folder with the checkpoint."""
    zip_path = Path(zip_path)
    with tempfile.TemporaryDirectory(prefix="netvlad-test-zip-") as temp:
        directory = write_official_dir(tensors, temp)
        with zipfile.ZipFile(zip_path, "w", compression=compression) as archive:
            archive.write(directory, f"{OFFICIAL_NAME}/")
            for file in sorted(directory.iterdir()):
                archive.write(file, f"{OFFICIAL_NAME}/{file.name}")
        shutil.rmtree(directory)
    return zip_path


def _cell(*items: object) -> np.ndarray:
    """A MATLAB cell array (1-D object array) holding `items` exactly, without broadcasting."""
    cell = np.empty(len(items), dtype=object)
    for i, item in enumerate(items):
        cell[i] = item
    return cell


def _conv(name: str, kernel: np.ndarray, bias: np.ndarray, pad: int) -> dict:
    """A MatConvNet conv layer struct; pad/stride as MATLAB's [t b l r] and [sy sx] doubles."""
    return {
        "name": name,
        "type": "conv",
        "weights": _cell(kernel, bias),
        "pad": np.full((1, 4), float(pad)),
        "stride": np.ones((1, 2)),
        "dilate": np.ones((1, 2)),
    }


def _normalize(name: str) -> dict:
    """A MatConvNet normalize layer that is an L2 normalisation: [N kappa alpha beta]."""
    return {"name": name, "type": "normalize", "param": np.array([[1024.0, 1e-12, 1.0, 0.5]])}


def matconvnet_layers(tensors: Mapping[str, np.ndarray]) -> list[dict]:
    """The `net.layers` list of the released model as dicts, in file order (editable by tests)."""
    layers: list[dict] = []
    for conv in CONV_LAYERS:
        suffix = conv.removeprefix("conv")
        layers.append(_conv(conv, tensors[f"{conv}/kernel"], tensors[f"{conv}/bias"], pad=1))
        if conv != CONV_LAYERS[-1]:
            layers.append({"name": f"relu{suffix}", "type": "relu", "leak": 0.0})
        if conv in POOL_AFTER:
            layers.append(
                {
                    "name": f"pool{suffix[0]}",
                    "type": "pool",
                    "method": "max",
                    "pool": np.array([[2.0, 2.0]]),
                    "stride": np.array([[2.0, 2.0]]),
                    "pad": np.zeros((1, 4)),
                }
            )
    assignment = np.asarray(tensors["assignment/kernel"])
    centres = np.asarray(tensors["cluster_centers"])
    dim, clusters = assignment.shape[2], assignment.shape[3]
    wpca = np.asarray(tensors["WPCA/kernel"])
    layers += [
        _normalize("preL2"),
        {
            "name": "vlad_core",
            "type": "custom",
            "weights": _cell(assignment.reshape(dim, clusters), centres.reshape(dim, clusters)),
            "K": float(clusters),
        },
        _normalize("vlad_intranorm"),
        {"name": "postL2", "type": "custom"},
        _conv("WPCA", wpca, tensors["WPCA/bias"], pad=0),
        {"name": "finalL2", "type": "custom"},
    ]
    return layers


def write_structed_mat(
    tensors: Mapping[str, np.ndarray], path: str | Path, layers: list[dict] | None = None
) -> Path:
    """Write a structed MatConvNet .mat (docs/NETWORK.md) from `tensors` or edited `layers`."""
    path = Path(path)
    layers = matconvnet_layers(tensors) if layers is None else layers
    average = np.asarray(tensors["average_rgb"]).reshape(1, 1, 3)
    net = {
        "meta": {"normalization": {"averageImage": average, "imageSize": np.array([[224.0] * 2])}},
        "layers": _cell(*layers),
    }
    scipy.io.savemat(path, {"net": net}, do_compression=False, oned_as="column")
    return path


def write_stats(
    path: str | Path,
    image: np.ndarray,
    outputs: Sequence[tuple[str, np.ndarray]],
    input_in_outs: bool = False,
) -> Path:
    """Write a stats .mat as MATLAB would: `input` (mean-subtracted) and `outs`, single precision.

    `outputs` are one image's (name, array) pairs in our layouts (layer_outputs without the
    batch axis, or the NumPy reference); input_in_outs=True writes netvlad_tf's form instead.
    """
    image = np.asarray(image, np.float32)
    outs = [to_matconvnet(name, np.asarray(a, np.float32)) for name, a in outputs]
    if input_in_outs:
        outs.insert(0, image)
    cell = np.empty(len(outs), dtype=object)  # a MATLAB cell array
    for i, array in enumerate(outs):
        cell[i] = array
    contents = {"outs": cell} if input_in_outs else {"input": image, "outs": cell}
    scipy.io.savemat(path, contents, do_compression=False)
    return Path(path)
