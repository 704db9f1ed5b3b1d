"""`--precision int8`: int8 convolutions and whitening on LiteRT, checked by retrieval.

The VGG16 convolutions (mean subtraction to conv5_3) are over 99% of the multiply-adds;
quantized to int8 with calibrated activation ranges (calibration.py) and run by LiteRT's XNNPACK
kernels they are about four times faster than float32 (docs/BENCHMARKS.md). The NetVLAD layers
after conv5_3 run in float32 TensorFlow on the whole batch at once, as at every other precision;
the whitening runs in LiteRT as two int8 levels that give float32's result to about 1e-4
(tflite.WhiteningRunner), and TensorFlow holds no copy of its matrix. One LiteRT
interpreter is prepared per image size in use, the least recently used beyond MAX_SIZES
dropped. Before serving, int8 must keep retrieval: on CHECK_PLACES scene pairs every image's
nearest neighbour and the place-recognition AUC must match float32's (docs/INT8.md).
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from netvlad_client.evaluation import precision_recall, reference_auc

from netvlad_server.calibration import BUILTIN, ModelCache, cache_dir_for, calibration_set
from netvlad_server.network import NetVLADNetwork, check_images
from netvlad_server.tflite import (
    FEATURES_LAYER,
    TFLiteRunner,
    WhiteningRunner,
    convert,
    interpreter_class,
)
from netvlad_server.weights import NetVLADWeights

MAX_SIZES = 4  # prepared interpreters (image sizes) kept at once
CHECK_PLACES = 8  # scene pairs of the start-up agreement check
CHECK_SIZE = (240, 320)
CHECK_SEED = 2000  # scenes apart from the built-in calibration set's
CHECK_DARKER = 0.05  # the second view's light loss
MAX_NN_CHANGES = 0  # images whose nearest neighbour may differ from float32's
MAX_AUC_CHANGE = 0.02  # largest allowed |AUC(int8) - AUC(float32)|
TIE_MARGIN = 1e-3  # a neighbour change float32 ranks closer than this (cosine) is a tie
MIN_INFORMATIVE_RECALL = 0.5  # below, float32 cannot tell the places apart: cosine decides
MIN_COSINE = 0.999  # what an uninformative check asks for instead
CONVERSION_VERSION = "2"  # part of the cache key: change it when convert()'s settings change
log = logging.getLogger("netvlad_server")


def _uint8_images(images: np.ndarray) -> np.ndarray:
    """Checked images as uint8 pixels, float ones rounded (what the int8 models take)."""
    array = check_images(images)
    if array.dtype != np.uint8:
        array = np.clip(np.rint(array), 0, 255).astype(np.uint8)
    return array


def unit_rows(whitened: np.ndarray) -> np.ndarray:
    """finalL2 as the network computes it: each row over sqrt(max(sum of squares, 1e-12))."""
    norms = np.sqrt(np.maximum(np.sum(whitened * whitened, axis=1, keepdims=True), 1e-12))
    return (whitened / norms).astype(np.float32)


class Int8RefusedError(ValueError):
    """int8 changed retrieval on the agreement check; the message holds the measured numbers."""


class Int8Network:
    """Images [B, H, W, C] in, float32 descriptors [B, P] out: int8 convolutions, float32 tail."""

    precision = "int8"

    def __init__(self, features_model: bytes, network: NetVLADNetwork,
                 threads: int | None = None, max_sizes: int = MAX_SIZES,
                 whitening: WhiteningRunner | None = None) -> None:
        """whitening None: the float32 whitening in TensorFlow (`network`'s)."""
        interpreter_class()  # fail now, with the install hint, if LiteRT is missing
        self._model = features_model
        self._network = network
        self._whitening = whitening
        self._threads = threads
        self._max_sizes = max_sizes
        self._runners: OrderedDict[tuple[int, int], TFLiteRunner] = OrderedDict()
        self._lock = threading.Lock()
        self._float32_released = False
        self.agreement: Agreement | None = None  # the start-up check's result
        self.check_seconds: float | None = None  # and how long it took
        self.output_dims = network.output_dims
        self.device = "/CPU:0"

    @property
    def prepared_sizes(self) -> list[tuple[int, int]]:
        """Image sizes with a prepared interpreter, least recently used first."""
        return list(self._runners)

    def _runner(self, size: tuple[int, int]) -> TFLiteRunner:
        """The interpreter prepared for `size`, made (and the oldest dropped) when needed."""
        runner = self._runners.get(size)
        if runner is None:
            runner = TFLiteRunner(self._model, self._threads)
            self._runners[size] = runner
            while len(self._runners) > self._max_sizes:
                self._runners.popitem(last=False)
        self._runners.move_to_end(size)
        return runner

    def features(self, images: np.ndarray) -> np.ndarray:
        """conv5_3 outputs [B, H/16, W/16, D] (float32) of checked images, one image at a time.

        The model takes uint8 pixels, as the server's decoded images and an exported file's
        input are: the server's descriptors and LiteRT's from `export` then agree to float
        rounding. Float images are rounded to uint8 first.
        """
        array = _uint8_images(images)
        if array.shape[-1] == 1:  # gray: the network broadcasts it to RGB, so does this
            array = np.repeat(array, 3, axis=-1)
        with self._lock:
            runner = self._runner(tuple(array.shape[1:3]))
            return np.concatenate([runner(image[np.newaxis]) for image in array])

    def __call__(self, images: np.ndarray, dims: int | None = None) -> np.ndarray:
        """Describe images [B,H,W,C] or [H,W,C] (uint8 or float 0..255) as float32 [B, dims]."""
        from netvlad_server.network import truncate_descriptors

        if dims is not None:
            truncate_descriptors(np.zeros((1, self.output_dims), np.float32), dims)  # check first
        desc = self.whiten(self.pooled(images))
        return desc if dims is None else truncate_descriptors(desc, dims)

    def pooled(self, images: np.ndarray) -> np.ndarray:
        """The first of the two stages of a stepped batch (service.py): postL2 rows [B, D*K]."""
        return self._network.pooled_from_features(self.features(images))

    def whiten(self, pooled: np.ndarray) -> np.ndarray:
        """The second stage: descriptors [B, P] of postL2 rows, whitened and unit length."""
        if self._whitening is None:
            return self._network.whiten(pooled)
        # LiteRT's two-level int8 whitening, then finalL2 as the network computes it
        return unit_rows(self._whitening(pooled))

    def float32_reference(self, images: np.ndarray) -> np.ndarray:
        """The same images' float32 descriptors: the yardstick of the agreement check."""
        if self._float32_released:
            raise RuntimeError("float32_reference: the float32 convolutions were released after "
                               "the start-up check; build a NetVLADNetwork to compare")
        if self._whitening is None:
            return self._network(images)
        return unit_rows(self._whitening.float32(self._network.pooled(_uint8_images(images))))

    def release_float32(self) -> None:
        """Let go of the float32 convolution weights, and the float32 whitening when LiteRT
        runs it, once the check is done (serving never needs them)."""
        self._network.drop_convolutions()
        if self._whitening is not None:
            self._whitening.release_float32()
        self._float32_released = True


@dataclass(frozen=True)
class Agreement:
    """Retrieval with int8 against float32 on scene pairs (two views of each place)."""

    images: int
    cosine_min: float
    cosine_median: float
    nn_changes: int  # images whose nearest neighbour differs from float32's
    decisive_changes: int  # of those, the ones float32 did not see as a tie (TIE_MARGIN)
    recall_float32: float  # share of images whose float32 nearest neighbour is the other view
    auc_float32: float
    auc_int8: float

    @property
    def informative(self) -> bool:
        """Whether float32 recognises the check's places at all (not so with random weights)."""
        return self.recall_float32 >= MIN_INFORMATIVE_RECALL

    @property
    def passed(self) -> bool:
        """True when int8 keeps retrieval within the stated tolerance (docs/INT8.md)."""
        if not self.informative:
            return self.cosine_min >= MIN_COSINE
        return (self.decisive_changes <= MAX_NN_CHANGES
                and abs(self.auc_int8 - self.auc_float32) <= MAX_AUC_CHANGE)

    def __str__(self) -> str:
        measured = (f"{self.decisive_changes} of {self.images} nearest neighbours changed "
                    f"(at most {MAX_NN_CHANGES} allowed; {self.nn_changes} counting float32's "
                    f"ties), AUC {self.auc_int8:.4f} against float32's {self.auc_float32:.4f} "
                    f"(at most {MAX_AUC_CHANGE} apart allowed), cosine to float32 min "
                    f"{self.cosine_min:.5f} median {self.cosine_median:.5f}")
        if self.informative:
            return (f"{measured}; float32 finds the other view for {self.recall_float32:.0%} "
                    "of the images")
        return (f"{measured}; float32 finds the other view for only "
                f"{self.recall_float32:.0%} of the images (these weights do not recognise "
                f"places), so the cosine decides: at least {MIN_COSINE} wanted")


def scene_pairs(places: int = CHECK_PLACES, size: tuple[int, int] = CHECK_SIZE,
                first_seed: int = CHECK_SEED) -> np.ndarray:
    """[2 * places, H, W, 3] uint8: place i's views at 2i and 2i+1.

    The second view is shifted by W/8 and CHECK_DARKER darker: mild enough that float32 with
    the random full-size demo weights finds every other view (15% darker defeats it), hard
    enough that the nearest other place is only about 0.004 further away than the other view
    (docs/INT8.md).
    """
    from netvlad_server.runtime import synthetic_scene

    height, width = size
    shift = width // 8
    views = []
    for place in range(places):
        wide = synthetic_scene(height, width + shift, seed=first_seed + place)
        views.append(wide[:, :width])
        darker = wide[:, shift:].astype(np.float32) * (1.0 - CHECK_DARKER)
        views.append(np.rint(darker).astype(np.uint8))
    return np.stack(views)


def similarities(descriptors: np.ndarray) -> np.ndarray:
    """Cosine similarity of every pair of unit descriptors, -inf on the diagonal."""
    similarity = descriptors.astype(np.float64) @ descriptors.T.astype(np.float64)
    np.fill_diagonal(similarity, -np.inf)
    return similarity


def retrieval(descriptors: np.ndarray) -> tuple[np.ndarray, float]:
    """(each image's nearest other image, AUC) of views ordered as scene_pairs makes them.

    AUC as the project's evaluation computes it: each image's best match is accepted in order
    of similarity and is right when it is the other view of the same place.
    """
    similarity = similarities(descriptors)
    nearest = np.argmax(similarity, axis=1)
    right = nearest == (np.arange(len(descriptors)) ^ 1)
    order = np.argsort(-similarity[np.arange(len(descriptors)), nearest], kind="stable")
    precision, recall = precision_recall(right[order], len(descriptors))
    return nearest, reference_auc(precision, recall)


def measure_agreement(network: Int8Network, images: np.ndarray) -> Agreement:
    """Compare `network`'s retrieval on scene-pair images with float32's.

    One image per float32 call: the full model's activations of a whole batch would raise
    the server's peak memory above what serving needs.
    """
    ours = network(images)
    reference = np.concatenate([network.float32_reference(image) for image in images])
    return compare(ours, reference)


def compare(ours: np.ndarray, reference: np.ndarray) -> Agreement:
    """The agreement of descriptors `ours` with float32's `reference`, both of scene pairs."""
    cosine = np.sum(ours * reference, axis=1)
    nearest, auc = retrieval(ours)
    nearest_reference, auc_reference = retrieval(reference)
    rows = np.arange(len(ours))
    similarity = similarities(reference)
    margin = similarity[rows, nearest_reference] - similarity[rows, nearest]
    changed = nearest != nearest_reference
    return Agreement(
        images=len(ours), cosine_min=float(cosine.min()),
        cosine_median=float(np.median(cosine)), nn_changes=int(changed.sum()),
        decisive_changes=int(np.sum(changed & (margin > TIE_MARGIN))),
        recall_float32=float(np.mean(nearest_reference == (rows ^ 1))),
        auc_float32=auc_reference, auc_int8=auc)


def _cache_stem(model: str) -> str:
    """The cache file names' first part: the weight file's name, else "netvlad"."""
    path = Path(model).expanduser()
    return "netvlad" if path.is_dir() else path.name


def calibrated_features_model(weights: NetVLADWeights, network: NetVLADNetwork, model: str,
                              calibration: str | None) -> tuple[bytes, bool, Path]:
    """The int8 conv5_3 model for these weights: (content, read from cache, cache file)."""
    import tensorflow as tf

    calibrated = calibration_set(calibration)
    key = hashlib.sha256(f"{calibrated.digest}:{tf.__version__}:{CONVERSION_VERSION}".encode())
    cache = ModelCache(cache_dir_for(model), _cache_stem(model))
    fingerprint = weights.fingerprint
    kind = f"int8-{FEATURES_LAYER}"
    content, cached = cache.get_or_make(kind, fingerprint, key.hexdigest(), lambda: convert(
        network, "int8", calibrated, last=FEATURES_LAYER))
    return content, cached, cache.path(kind, fingerprint, key.hexdigest())


def build_int8_network(weights: NetVLADWeights, model: str, calibration: str | None = None,
                       threads: int | None = None) -> Int8Network:
    """The int8 network of `weights`, calibrated (or read from the cache) and checked.

    Raises Int8RefusedError with the measured numbers when int8 changes retrieval.
    """
    network = NetVLADNetwork(weights, "float32", whitening=False)  # LiteRT whitens (tflite.py)
    content, cached, path = calibrated_features_model(weights, network, model, calibration)
    shown = "built-in generated scenes" if calibration in (None, BUILTIN) else calibration
    log.info("int8 convolutions %s %s (calibration: %s)", "read from" if cached else "calibrated,"
             " cached at", path, shown)
    whitening = WhiteningRunner(np.reshape(weights.tensors["WPCA/kernel"],
                                           [-1, network.output_dims]),
                                weights.tensors["WPCA/bias"], threads)
    int8 = Int8Network(content, network, threads, whitening=whitening)
    started = time.perf_counter()
    agreement = measure_agreement(int8, scene_pairs())
    seconds = time.perf_counter() - started
    int8.agreement, int8.check_seconds = agreement, seconds
    int8.release_float32()
    height, width = CHECK_SIZE
    if not agreement.passed:
        raise Int8RefusedError(
            f"--precision int8 refused: on {CHECK_PLACES} scene pairs at {height}x{width}, "
            f"{agreement}. Calibrate with frames like yours (--calibration DIR) or run "
            "--precision auto or float32 (docs/INT8.md)")
    log.info("precision int8: retrieval kept on %d scene pairs at %dx%d (%s rule, checked in "
             "%.1f s): %s", CHECK_PLACES, height, width,
             "retrieval" if agreement.informative else "cosine", seconds, agreement)
    return int8
