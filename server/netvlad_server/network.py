"""The NetVLAD forward pass (VGG16 to conv5_3, NetVLAD, whitening PCA) written from tf.nn ops.

Every size (channels, clusters K, descriptor dims D, output dims) is read from the weights, so the
tiny test model and the released 4096-D model run through exactly the same code.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import tensorflow as tf

from netvlad_server.weights import CONV_LAYERS, POOL_AFTER, NetVLADWeights

PRECISIONS = ("float32", "bfloat16", "float16")
MIN_SIDE = 16  # four 2x2 'valid' poolings must leave at least one pixel

# Tail of the network after conv5_3, as (name, MatConvNet layer type), in the released file's order.
_TAIL = (
    ("preL2", "normalize"),
    ("vlad_core", "custom"),
    ("intranorm", "normalize"),
    ("postL2", "custom"),
    ("WPCA", "conv"),
    ("finalL2", "custom"),
)


def default_device() -> str:
    """Where the network runs unless told: the first GPU TensorFlow sees, else the CPU."""
    return "/GPU:0" if tf.config.list_logical_devices("GPU") else "/CPU:0"


class ImageShapeError(ValueError):
    """An image array the network cannot take: wrong rank, channel count, size or pixel type."""


def layer_plan() -> list[tuple[str, str]]:
    """(name, MatConvNet type) of every layer in MatConvNet order, as layer_outputs yields it."""
    plan: list[tuple[str, str]] = []
    for conv in CONV_LAYERS:
        suffix = conv.removeprefix("conv")  # "1_1"
        plan.append((conv, "conv"))
        if conv != CONV_LAYERS[-1]:
            plan.append((f"relu{suffix}", "relu"))
        if conv in POOL_AFTER:
            plan.append((f"pool{suffix[0]}", "pool"))
    plan.extend(_TAIL)
    return plan


def check_images(images: np.ndarray) -> np.ndarray:
    """Return images [B, H, W, C] as uint8 (untouched) or float32, or raise ImageShapeError."""
    array = np.asarray(images)
    if array.ndim == 3:
        array = array[np.newaxis]
    if array.ndim != 4:
        raise ImageShapeError(
            f"expected one image [H, W, C] or a batch [B, H, W, C]; got an array of rank "
            f"{array.ndim} with shape {tuple(array.shape)}"
        )
    batch, height, width, channels = array.shape
    if batch == 0:
        raise ImageShapeError("got an empty batch (shape has B = 0); send at least one image")
    if channels not in (1, 3):
        raise ImageShapeError(
            f"expected 1 (grayscale) or 3 (RGB) channels in the last axis; got {channels} "
            f"(shape {tuple(array.shape)}); drop alpha channels and use channels-last layout"
        )
    if height < MIN_SIDE or width < MIN_SIDE:
        raise ImageShapeError(
            f"image is {height}x{width} pixels; both sides must be at least {MIN_SIDE} "
            f"(four 2x2 poolings must leave one pixel); resize it up"
        )
    if array.dtype != np.uint8 and not np.issubdtype(array.dtype, np.floating):
        raise ImageShapeError(
            f"expected uint8 or float pixel values in 0..255; got dtype {array.dtype}"
        )
    if array.dtype == np.uint8:
        return array
    if not np.isfinite(array).all():
        raise ImageShapeError("image holds NaN or infinite pixel values")
    return array.astype(np.float32, copy=False)


def _check_dims(dims: int, full: int) -> None:
    """Refuse a truncation length that is not an integer from 1 to the descriptor length."""
    if isinstance(dims, bool) or not isinstance(dims, (int, np.integer)) or not 1 <= dims <= full:
        raise ValueError(f"dims must be an integer from 1 to {full}; got {dims!r}")


def truncate_descriptors(desc: np.ndarray, dims: int) -> np.ndarray:
    """Keep the first `dims` values of each row (PCA order) and rescale rows to unit L2 norm."""
    desc = np.asarray(desc, dtype=np.float32)
    _check_dims(dims, desc.shape[-1])
    head = desc[..., :dims]
    norms = np.sqrt(np.maximum(np.sum(head * head, axis=-1, keepdims=True), 1e-12))
    return (head / norms).astype(np.float32)


def _l2_max(x: tf.Tensor, axis: int) -> tf.Tensor:
    """x / sqrt(max(sum x^2, 1e-12)) along axis (docs/NETWORK.md, steps 8 and 14)."""
    return x / tf.sqrt(tf.maximum(tf.reduce_sum(tf.square(x), axis=axis, keepdims=True), 1e-12))


def _l2_plus(x: tf.Tensor, axis: int) -> tf.Tensor:
    """x / sqrt(sum x^2 + 1e-12) along axis, MatConvNet style (docs/NETWORK.md, steps 11 and 12)."""
    return x / tf.sqrt(tf.reduce_sum(tf.square(x), axis=axis, keepdims=True) + 1e-12)


class NetVLADNetwork:
    """Image batches in, whitened unit-length NetVLAD descriptors out; weights loaded once."""

    def __init__(self, weights: NetVLADWeights, precision: str = "float32", xla: bool = False,
                 device: str | None = None, whitening: bool = True):
        """whitening False: no TensorFlow copy of the whitening matrix (the int8 path runs it
        in LiteRT); only pooled and pooled_from_features work then."""
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}; got {precision!r}")
        self.precision = precision
        self.xla = xla
        self.device = device or default_device()
        self._dtype = tf.as_dtype(precision)  # convolutions, ReLUs and pools run in this type
        with tf.device(self.device):  # weights live where the maths runs: no copy per call
            self._build_tensors(weights, whitening)
        self.layer_names = [name for name, _ in layer_plan()]
        offset = tf.TensorSpec([3], tf.float32)
        self._descriptors = tf.function(
            lambda x: self._layers(x, self._mean)[-1], jit_compile=xla,
            input_signature=[tf.TensorSpec([None, None, None, None], tf.float32)])
        # uint8 images cross to the device as they are (4x fewer bytes) and are cast there.
        self._descriptors_uint8 = tf.function(
            lambda x: self._layers(tf.cast(x, tf.float32), self._mean)[-1], jit_compile=xla,
            input_signature=[tf.TensorSpec([None, None, None, None], tf.uint8)])
        self._all_layers = tf.function(
            self._layers, input_signature=[tf.TensorSpec([None, None, None, None], tf.float32),
                                           offset])
        # The two stages of a stepped batch (pooled, whiten): see those methods.
        self._pooled_uint8 = tf.function(
            lambda x: self._tail(self._convolutions(tf.cast(x, tf.float32), self._mean,
                                                    self._convs)[-1], whiten=False)[-1],
            input_signature=[tf.TensorSpec([None, None, None, None], tf.uint8)])
        self._whitened = tf.function(
            lambda x: self._whiten(x)[-1],
            input_signature=[tf.TensorSpec([None, None], tf.float32)])
        self._from_features = tf.function(  # the int8 path's float32 tail (tflite.py)
            lambda x: self._tail(x)[-1],
            input_signature=[tf.TensorSpec([None, None, None, None], tf.float32)])
        self._pooled_from_features = tf.function(  # the same without the whitening (int8.py)
            lambda x: self._tail(x, whiten=False)[-1],
            input_signature=[tf.TensorSpec([None, None, None, None], tf.float32)])

    def _build_tensors(self, weights: NetVLADWeights, whitening: bool) -> None:
        """Hold each weight once as a device tensor: convolutions in the compute type, rest f32.

        The traced functions capture these tensors by reference. Writing the convolution kernels
        into each traced graph as constants instead cost about 0.55 GB per trace on the full
        model (graph, function library, optimised copies and oneDNN's cached kernels) for a few
        percent of speed at batch 1; see docs/BENCHMARKS.md.
        """
        t = weights.tensors
        self._mean = tf.constant(np.reshape(t["average_rgb"], [3]), tf.float32)
        self._convs = [(tf.constant(t[f"{name}/kernel"], self._dtype),  # [kh, kw, in, out]
                        tf.constant(t[f"{name}/bias"], self._dtype))  # [out]
                       for name in CONV_LAYERS]
        # float32_reference needs the float32 kernels of a lower-precision network: views of the
        # loaded arrays (no copy), kept until drop_float32_weights().
        self._convs_float32: list[tuple[np.ndarray, np.ndarray]] | None = (
            None if self._dtype == tf.float32 else
            [(t[f"{name}/kernel"], t[f"{name}/bias"]) for name in CONV_LAYERS])
        dims, clusters = t["assignment/kernel"].shape[2:]
        self.cluster_dim, self.num_clusters = int(dims), int(clusters)
        self._assign = tf.constant(np.reshape(t["assignment/kernel"], [dims, clusters]))  # D x K
        self._centers = tf.constant(np.reshape(t["cluster_centers"], [dims, clusters]))  # D x K
        wpca = t["WPCA/kernel"]
        self.output_dims = int(wpca.shape[-1])
        self._wpca = (tf.constant(np.reshape(wpca, [dims * clusters, self.output_dims]))  # DK x P
                      if whitening else None)
        self._wpca_bias = tf.constant(t["WPCA/bias"])  # [P]
        # tf.constant leaves a second, temporary copy of a large array until the next eager
        # operation: let it go now rather than at the first request (0.5 GB for the WPCA).
        tf.identity(self._mean)

    def _layers(self, images: tf.Tensor, offset: tf.Tensor) -> list[tf.Tensor]:
        """Every layer's output, in layer_plan() order, for float32 images [B, H, W, C]."""
        return self._layers_in(images, offset, self._convs)

    def _layers_in(self, images: tf.Tensor, offset: tf.Tensor,
                   convs: list[tuple[tf.Tensor, tf.Tensor]]) -> list[tf.Tensor]:
        """_layers with these convolution weights; their type is the one convolutions run in."""
        out = self._convolutions(images, offset, convs)
        return out + self._tail(out[-1])  # out[-1]: conv5_3

    def _convolutions(self, images: tf.Tensor, offset: tf.Tensor,
                      convs: list[tuple[tf.Tensor, tf.Tensor]]) -> list[tf.Tensor]:
        """The layers from conv1_1 to conv5_3, in layer_plan() order."""
        out: list[tf.Tensor] = []
        # Steps 0-1: [B,H,W,1] - [3] broadcasts a gray channel to RGB while subtracting the mean.
        x = tf.ensure_shape(images - offset, [None, None, None, 3])
        x = tf.cast(x, convs[0][0].dtype)
        for name, (kernel, bias) in zip(CONV_LAYERS, convs, strict=True):
            x = tf.nn.bias_add(tf.nn.conv2d(x, kernel, strides=1, padding="SAME"), bias)
            out.append(x)
            if name != CONV_LAYERS[-1]:  # conv5_3 has no ReLU
                x = tf.nn.relu(x)
                out.append(x)
            if name in POOL_AFTER:
                x = tf.nn.max_pool2d(x, ksize=2, strides=2, padding="VALID")
                out.append(x)
        return out

    def _tail(self, conv5: tf.Tensor, whiten: bool = True) -> list[tf.Tensor]:
        """The layers after conv5_3 (preL2 to finalL2, or to postL2 without `whiten`), float32."""
        out: list[tf.Tensor] = []
        d, k = self.cluster_dim, self.num_clusters
        x = _l2_max(tf.cast(conv5, tf.float32), axis=-1)  # [B, H', W', D]
        out.append(x)
        batch = tf.shape(x)[0]
        feats = tf.reshape(x, [batch, -1, d])  # [B, N, D], N = H' * W' positions
        assign = tf.nn.softmax(tf.einsum("bnd,dk->bnk", feats, self._assign), axis=-1)  # [B,N,K]
        # V[d,k] = sum_p a_k(p) x_d(p) + C[d,k] * sum_p a_k(p)
        vlad = tf.einsum("bnd,bnk->bdk", feats, assign)  # [B, D, K]
        vlad += self._centers * tf.reduce_sum(assign, axis=1)[:, tf.newaxis, :]
        out.append(vlad)
        vlad = _l2_plus(vlad, axis=1)  # intra-normalisation: each cluster's D-vector
        out.append(vlad)
        flat = _l2_plus(tf.reshape(vlad, [batch, d * k]), axis=-1)  # D-major: V[d,k] -> d*K + k
        out.append(flat)
        return out + self._whiten(flat) if whiten else out

    def _whiten(self, flat: tf.Tensor) -> list[tf.Tensor]:
        """WPCA [B, P] and finalL2 [B, P] from postL2 [B, D*K]."""
        if self._wpca is None:
            raise RuntimeError("this network was built without its whitening (whitening=False):"
                               " it gives postL2 rows only (pooled, pooled_from_features)")
        whitened = tf.matmul(flat, self._wpca) + self._wpca_bias  # [B, P]
        return [whitened, _l2_max(whitened, axis=-1)]

    def __call__(self, images: np.ndarray, dims: int | None = None) -> np.ndarray:
        """Describe images [B,H,W,C] or [H,W,C] (uint8 or float 0..255) as float32 [B, dims]."""
        if dims is not None:
            _check_dims(dims, self.output_dims)  # before the forward pass, not after
        array = check_images(images)
        run = self._descriptors_uint8 if array.dtype == np.uint8 else self._descriptors
        with tf.device(self.device):
            desc = self._finite(run(array).numpy())
        return desc if dims is None else truncate_descriptors(desc, dims)

    def _finite(self, desc: np.ndarray) -> np.ndarray:
        """desc, after checking that no activation overflowed on the way."""
        if not np.isfinite(desc).all():
            raise FloatingPointError(
                f"the network produced non-finite descriptors in {self.precision}: an activation "
                "overflowed (float16 tops out at 65504); run in bfloat16 or float32 instead")
        return desc

    def float32_reference(self, images: np.ndarray) -> np.ndarray:
        """Descriptors from float32 convolutions, the rest shared: a lower precision's yardstick.

        Costs no second copy of the whitening matrix, unlike a float32 NetVLADNetwork. The
        float32 kernels exist as tensors only during the call.
        """
        if self._dtype == tf.float32:
            convs = self._convs
        elif self._convs_float32 is None:
            raise RuntimeError(
                "float32_reference: this network's float32 kernels were released by "
                "drop_float32_weights(); build a new NetVLADNetwork from the weights to compare")
        else:
            convs = self._convs_float32
        array = check_images(images).astype(np.float32, copy=False)
        with tf.device(self.device):
            kernels = [(tf.constant(kernel), tf.constant(bias)) for kernel, bias in convs]
            run = tf.function(lambda x: self._layers_in(x, self._mean, kernels)[-1])
            return run(array).numpy()

    def descriptors_from_features(self, features: np.ndarray) -> np.ndarray:
        """Descriptors [B, P] from conv5_3 outputs [B, H', W', D]: the layers after conv5_3.

        For a runtime that computes the convolutions itself (the int8 path, tflite.py).
        """
        with tf.device(self.device):
            return self._from_features(np.asarray(features, np.float32)).numpy()

    def pooled_from_features(self, features: np.ndarray) -> np.ndarray:
        """postL2 rows [B, D*K] from conv5_3 outputs: descriptors_from_features but for the
        whitening, which the int8 path runs in LiteRT (tflite.WhiteningRunner)."""
        with tf.device(self.device):
            return self._pooled_from_features(np.asarray(features, np.float32)).numpy()

    def pooled(self, images: np.ndarray) -> np.ndarray:
        """uint8 images [B, H, W, C] -> the normalised NetVLAD vectors [B, D*K], unwhitened.

        With `whiten` this splits a batch in two stages (service.py's stepped runner): the
        convolutions, whose cost grows with every image, run a few images at a time, and the
        whitening, whose cost is mostly reading its D*K x P matrix once per call, runs once
        for the whole batch. Together they give __call__'s descriptors.
        """
        array = check_images(images)
        if array.dtype != np.uint8:
            raise TypeError(f"pooled takes uint8 images, got {array.dtype}")
        with tf.device(self.device):
            return self._pooled_uint8(array).numpy()

    def whiten(self, pooled: np.ndarray) -> np.ndarray:
        """The descriptors [B, P] of `pooled` rows [B, D*K]: whitening, then L2."""
        with tf.device(self.device):
            return self._finite(self._whitened(np.asarray(pooled, np.float32)).numpy())

    def layer_function(self, last: str) -> Callable[[tf.Tensor], tf.Tensor]:
        """float32 images [B, H, W, C] -> layer `last`'s output, traceable (for converters).

        A layer up to conv5_3 traces the convolutions only: no whitening matrix in the graph.
        """
        index = self.layer_names.index(last)
        if index <= self.layer_names.index("conv5_3"):
            return lambda images: self._convolutions(images, self._mean, self._convs)[index]
        return lambda images: self._layers(images, self._mean)[index]

    def drop_float32_weights(self) -> None:
        """Let go of the float32 kernels float32_reference needs (a lower precision's copy)."""
        self._convs_float32 = None

    def drop_convolutions(self) -> None:
        """Let go of every convolution weight: another runtime runs them (the int8 path).

        Only descriptors_from_features works afterwards.
        """
        self._convs = []
        self._convs_float32 = None

    def layer_outputs(
        self, images: np.ndarray, subtract_mean: bool = True
    ) -> list[tuple[str, np.ndarray]]:
        """Every layer's float32 output for a batch, with the batch axis, in MatConvNet order.

        Layouts: VGG layers and preL2 [B,H,W,C]; vlad_core, intranorm [B,D,K]; postL2 [B,D*K];
        WPCA, finalL2 [B,P]. subtract_mean=False takes images whose mean was already removed,
        as MatConvNet's vl_simplenn receives them.
        """
        array = check_images(images).astype(np.float32, copy=False)
        offset = self._mean if subtract_mean else tf.zeros([3], tf.float32)
        with tf.device(self.device):
            tensors = self._all_layers(array, offset)
        return [
            (name, tf.cast(t, tf.float32).numpy())
            for name, t in zip(self.layer_names, tensors, strict=True)
        ]
