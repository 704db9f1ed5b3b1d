"""`netvlad-server`: load the weights once, warm up, serve DescriptorService, drain on SIGTERM.

The gRPC server starts first with the standard health service saying NOT_SERVING (and
DescriptorService answering UNAVAILABLE); it turns SERVING once the weights are loaded and the
expected image sizes have run once. Standard server reflection is on, /metrics is served on its own
port. SIGTERM or SIGINT: health NOT_SERVING, no new RPCs, admitted work finishes, exit 0.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from wsgiref.simple_server import WSGIServer

import grpc
import numpy as np
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from netvlad_server.batching import DynamicBatcher
from netvlad_server.config import ServerConfig, parse_config
from netvlad_server.metrics import ServerMetrics
from netvlad_server.places.service import (
    PLACES_SERVICE_NAME,
    PlaceIndexService,
    add_place_index_service,
)
from netvlad_server.security import load_security
from netvlad_server.service import (
    SERVICE_NAME,
    BatchItem,
    DescriptorService,
    LoadedModel,
    ModelDescription,
    add_descriptor_service,
    batching_policy,
    make_batch_runner,
    make_stepped_runner,
)

log = logging.getLogger("netvlad_server")
ModelLoader = Callable[[ServerConfig], LoadedModel]
_HEALTH_NAMES = ("", SERVICE_NAME, PLACES_SERVICE_NAME)
_SERVING_GAUGE_NAMES = _HEALTH_NAMES[1:]  # netvlad_serving{service}; "" is the whole server
_DEMO_WARNING = (
    "DEMO WEIGHTS (%s): random weights, the descriptors MEAN NOTHING and are only good for trying "
    "the software; pass --model with the official checkpoint directory or zip, a structed .mat or "
    "an exported .npz (see models/)")


def load_model(config: ServerConfig) -> LoadedModel:
    """Read the weights named by config.model and build the TensorFlow network (slow: seconds)."""
    import tensorflow as tf

    from netvlad_server.network import truncate_descriptors
    from netvlad_server.runtime import MemoryKeeper, build_network, configure_tensorflow
    from netvlad_server.weights import load_weights

    configure_tensorflow(config.intra_op_threads, config.inter_op_threads,
                         config.gpu_memory_growth)  # before TensorFlow's first operation
    start = time.perf_counter()
    weights = load_weights(config.model)
    log.info("weights read in %.1f s (%.0f MB)", time.perf_counter() - start, weights.nbytes / 1e6)
    if config.precision == "int8":  # LiteRT int8 convolutions, checked by retrieval (int8.py)
        from netvlad_server.int8 import build_int8_network

        network = build_int8_network(weights, config.model, config.calibration,
                                     config.intra_op_threads or None)
    else:
        network = build_network(weights, config.precision, config.xla, *config.warmup_sizes[:1])
    description = ModelDescription(
        model_name=weights.name, weight_source=weights.source, weight_format=weights.format,
        demo=weights.format == "demo", output_dims=network.output_dims,
        num_clusters=weights.num_clusters, cluster_dim=weights.cluster_dim,
        precision=network.precision, xla=config.xla,
        device=network.device, tensorflow_version=tf.__version__,
        weights_sha256=weights.fingerprint)
    # Free heap pages go back to the system after new batch shapes and idle spells.
    keeper = MemoryKeeper(network)
    return LoadedModel(forward=keeper, truncate=truncate_descriptors, description=description,
                       stages=(keeper.track(network.pooled), keeper.track(network.whiten)))


def _run_once(model: LoadedModel, batch: int, height: int, width: int) -> None:
    """One forward pass of a zero batch, and one through the two stages of stepped batches."""
    images = np.zeros((batch, height, width, 3), np.uint8)
    model.forward(images)
    if model.stages is not None:
        first, second = model.stages
        second(first(images))


def warm_up(model: LoadedModel, config: ServerConfig, release_libraries: bool = False) -> None:
    """Run each expected image size once so the first real request pays no tracing cost.

    oneDNN sets up a new batch size in well under a call's time, so batch 1 is enough; XLA
    compiles every batch shape anew (about a second each), so under XLA every batch size runs.
    With release_libraries (the netvlad-server process, not a server embedded in another
    program), the library pages start-up touched are then handed back and the first size runs
    once more, so that the pages a forward pass needs are resident again before SERVING.
    """
    from netvlad_server.runtime import release_free_memory, release_library_pages, resident_mib

    batches = range(1, config.max_batch_size + 1) if config.xla else (1,)
    for height, width in config.warmup_sizes:
        start = time.perf_counter()
        for batch in batches:
            _run_once(model, batch, height, width)
        log.info("warm-up %dx%d: %.2f s", height, width, time.perf_counter() - start)
    release_free_memory()  # what loading and warm-up freed, before the long steady state
    if not release_libraries:
        return
    start, before = time.perf_counter(), resident_mib()
    advised = release_library_pages()
    if not advised:
        log.info("library pages stay resident: this kernel has no MADV_PAGEOUT (Linux 5.4+)")
        return
    for height, width in config.warmup_sizes[:1]:
        _run_once(model, 1, height, width)
    release_free_memory()
    log.info("library pages released (%d MiB of read-only mappings advised): RSS %.0f -> %.0f "
             "MiB with a forward pass's pages back, in %.2f s", advised >> 20, before,
             resident_mib(), time.perf_counter() - start)


class NetVLADServer:
    """The whole server in one object: start() listens, load() makes it SERVING, stop() drains."""

    def __init__(self, config: ServerConfig, loader: ModelLoader = load_model,
                 release_libraries: bool = False) -> None:
        self.config = config
        self._release_libraries = release_libraries  # warm_up's; the server process's own
        self.metrics = ServerMetrics(config.max_batch_size)
        self.metrics.set_serving(_SERVING_GAUGE_NAMES, False)  # health starts NOT_SERVING
        self._loader = loader
        self._decode_pool = ThreadPoolExecutor(config.decode_threads, thread_name_prefix="decode")
        self.service = DescriptorService(config, self.metrics, self._decode_pool)
        self.places = PlaceIndexService(config, self.metrics, self.service)
        self.health: health.aio.HealthServicer | None = None
        self.port = 0
        self._server: grpc.aio.Server | None = None
        self._batcher: DynamicBatcher[BatchItem, np.ndarray] | None = None
        self._not_serving: asyncio.Future | None = None  # set if the batcher ever dies
        self._metrics_http: tuple[WSGIServer, threading.Thread] | None = None

    @property
    def queue_depth(self) -> int:
        """Images waiting for the model right now."""
        return self._batcher.depth if self._batcher is not None else 0

    async def start(self) -> None:
        """Listen for gRPC (health NOT_SERVING until load() ends) and serve /metrics."""
        config = self.config
        security = load_security(config, self.metrics.auth_refused,
                                 self.metrics.security_reloaded)
        server = grpc.aio.server(interceptors=security.interceptors, options=[
            # gRPC sets SO_REUSEPORT by default: a second server on a busy port would then start
            # and silently take half of the connections instead of failing.
            ("grpc.so_reuseport", 0),
            ("grpc.max_receive_message_length", config.max_message_bytes),
            ("grpc.max_send_message_length", config.max_message_bytes),
        ])
        self.health = health.aio.HealthServicer()
        for name in _HEALTH_NAMES:
            await self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        add_descriptor_service(self.service, server)
        add_place_index_service(self.places, server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, PLACES_SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME),
            server)
        if config.metrics_port:
            try:
                self._metrics_http = self.metrics.serve(config.metrics_host, config.metrics_port)
            except OSError as exc:
                raise OSError(f"cannot serve metrics on {config.metrics_host}:"
                              f"{config.metrics_port}: {exc}; choose another --metrics-port / "
                              "NETVLAD_METRICS_PORT (0 disables metrics)") from exc
            log.info("metrics on http://%s:%d/metrics", config.metrics_host, config.metrics_port)
        else:
            log.info("metrics endpoint disabled (--metrics-port 0)")
        self.port = self._bind(server, security.credentials)
        await server.start()
        self._server = server
        log.info("gRPC listening on %s:%d, %s; health NOT_SERVING until the model is loaded",
                 config.host, self.port, security.summary)
        for note in security.notes:
            log.info("%s", note)
        for warning in security.warnings:
            log.warning("%s", warning)

    def _batcher_stopped(self, error: BaseException) -> None:
        """The scheduler died: report NOT_SERVING so probes restart the process (it cannot heal)."""
        if self.health is not None:
            health_service = self.health
            self.metrics.set_serving(_SERVING_GAUGE_NAMES, False)
            self._not_serving = asyncio.ensure_future(asyncio.gather(*(
                health_service.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
                for name in _HEALTH_NAMES)))

    def _bind(self, server: grpc.aio.Server,
              credentials: grpc.ServerCredentials | None = None) -> int:
        """Open the listening port (TLS when credentials are given); returns the port bound."""
        address = self.config.address
        try:
            port = (server.add_secure_port(address, credentials) if credentials is not None
                    else server.add_insecure_port(address))
        except RuntimeError as exc:
            port, reason = 0, f": {exc}"
        else:
            reason = ""
        if not port:
            raise OSError(f"cannot listen on {self.config.address}{reason}; is the port in use? "
                          "Choose another with --port / NETVLAD_PORT")
        return port

    async def load(self) -> None:
        """Load the weights and warm up (in a thread; health keeps answering), then SERVING."""
        config = self.config
        log.info("loading weights from %r (precision %s, XLA %s)", config.model, config.precision,
                 "on" if config.xla else "off")
        start = time.perf_counter()
        model = await asyncio.to_thread(self._loader, config)
        d = model.description
        log.info("loaded %s (%s from %s): output %d dims, K=%d clusters of %d dims, precision %s, "
                 "device %s, TensorFlow %s, in %.1f s", d.model_name, d.weight_format,
                 d.weight_source, d.output_dims, d.num_clusters, d.cluster_dim, d.precision,
                 d.device, d.tensorflow_version, time.perf_counter() - start)
        if d.demo:
            log.warning(_DEMO_WARNING, d.weight_source)
        await asyncio.to_thread(warm_up, model, config, self._release_libraries)
        self._batcher = DynamicBatcher(make_batch_runner(model), batching_policy(config),
                                       observer=self.metrics, thread_name="model",
                                       on_stopped=self._batcher_stopped,
                                       run_in_steps=make_stepped_runner(model))
        self._batcher.start()
        self.service.attach(model, self._batcher)
        await self.places.attach(d)
        self.metrics.set_model(model=d.model_name, precision=d.precision,
                               output_dims=d.output_dims, weight_format=d.weight_format,
                               demo=d.demo)
        assert self.health is not None
        for name in _HEALTH_NAMES:
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        self.metrics.set_serving(_SERVING_GAUGE_NAMES, True)
        log.info("SERVING: max_batch_size %d, max_queue_delay %.1f ms, queues of %d interactive "
                 "and %d bulk images (default priority %s), max %d images per request, default "
                 "resize %s", config.max_batch_size, config.max_queue_delay_ms,
                 config.max_queue_size, config.bulk_queue_size, config.default_priority,
                 config.max_images_per_request, config.resize)

    async def stop(self, grace: float | None = None) -> None:
        """Health NOT_SERVING, refuse new RPCs, let admitted ones finish (up to grace s), close."""
        grace = self.config.shutdown_grace_s if grace is None else grace
        if self.health is not None:
            await self.health.enter_graceful_shutdown()
        self.metrics.set_serving(_SERVING_GAUGE_NAMES, False)
        self.service.begin_shutdown()
        if self._server is not None:
            log.info("draining: %d image(s) queued, up to %.0f s for admitted requests",
                     self.queue_depth, grace)
            await self._server.stop(grace)
        if self._batcher is not None:
            try:
                await self._batcher.close()
            except Exception:
                if self._not_serving is None:
                    raise
                # The scheduler's own failure, logged when it stopped: draining goes on.
        await self.places.close()
        self._decode_pool.shutdown(wait=True)
        if self._metrics_http is not None:
            http, thread = self._metrics_http
            http.shutdown()
            http.server_close()
            thread.join()
        log.info("stopped")


async def serve(config: ServerConfig, loader: ModelLoader = load_model) -> int:
    """Run the server until SIGTERM/SIGINT; returns the process exit code."""
    server = NetVLADServer(config, loader, release_libraries=True)  # this process is ours
    await server.start()
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    loading = asyncio.create_task(server.load())
    waiting = asyncio.create_task(stopping.wait())
    done, _ = await asyncio.wait((loading, waiting), return_when=asyncio.FIRST_COMPLETED)
    if loading in done and loading.exception() is None:
        await waiting  # serving until a signal
    if not loading.done():
        log.info("signal received while loading; shutting down once loading ends")
        await asyncio.wait((loading,))
    exc = loading.exception()
    if exc is not None:
        log.error("could not load the model: %s", exc,
                  exc_info=None if isinstance(exc, (ValueError, OSError)) else exc)
    else:
        log.info("signal received: shutting down")
    waiting.cancel()
    await server.stop()
    return 0 if exc is None else 1


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of netvlad-server: parse flags (NETVLAD_* fallbacks), serve, exit code."""
    from netvlad_server.runtime import prefer_returning_memory

    prefer_returning_memory()  # before anything loads TensorFlow
    config = parse_config(argv)
    logging.basicConfig(level=config.log_level,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    import cv2

    cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_ERROR)  # hostile files spam warnings
    if config.model_is_default and config.model == "demo":
        log.warning("no --model given and no official weights under models/: " + _DEMO_WARNING,
                    config.model)
    elif config.model_is_default:
        log.info("no --model given: using %s", config.model)
    try:
        return asyncio.run(serve(config))
    except OSError as exc:
        log.error("%s", exc)
        return 1
