"""A real NetVLADServer running in this process on a background event loop, for server tests.

Also `InstrumentedModel`: the real tiny network behind a wrapper that records every batch the
server runs, can hold the model thread at a gate (to fill the queue deterministically) and can
fail on a chosen image height (a model call that raises).
"""

from __future__ import annotations

import asyncio
import dataclasses
import threading
import time
from collections.abc import Callable, Coroutine
from typing import Any

import grpc
import numpy as np
from netvlad_client._proto import netvlad_pb2 as pb
from netvlad_client._proto import netvlad_pb2_grpc as pb_grpc
from netvlad_client.bench.harness import free_port, read_metrics
from netvlad_server.config import ServerConfig
from netvlad_server.main import NetVLADServer
from netvlad_server.service import LoadedModel


def tiny_config(metrics_port: int, **overrides: Any) -> ServerConfig:
    """A configuration for demo-tiny on 127.0.0.1 with a free gRPC port and small warm-up."""
    base = ServerConfig(model="demo-tiny", host="127.0.0.1", port=0, metrics_host="127.0.0.1",
                        metrics_port=metrics_port, warmup_sizes=((32, 32),), shutdown_grace_s=10.0,
                        precision="float32",  # results are compared with the float32 network
                        index_dir="off")  # place tests that need a directory pass their own
    return dataclasses.replace(base, **overrides)


class InstrumentedModel:
    """The real model with a record of batch shapes, a gate holding calls, optional failures."""

    def __init__(self, model: LoadedModel, fail_height: int | None = None) -> None:
        self.model = model
        self.fail_height = fail_height
        self.batches: list[tuple[int, ...]] = []
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()

    def forward(self, batch: np.ndarray) -> np.ndarray:
        """Record, wait at the gate, fail on the chosen height, else run the real network."""
        return self._instrumented(self.model.forward, batch)

    def _instrumented(self, run: Callable[[np.ndarray], np.ndarray],
                      batch: np.ndarray) -> np.ndarray:
        """forward's recording, gate and failure around `run` (the forward or a first stage)."""
        self.batches.append(batch.shape)
        self.entered.set()
        assert self.gate.wait(60), "the test never opened the gate"
        if batch.shape[1] == self.fail_height:
            raise RuntimeError(f"test model refuses height {self.fail_height}")
        return run(batch)

    def loader(self, config: ServerConfig) -> LoadedModel:
        """A loader for NetVLADServer returning the instrumented model.

        A stepped batch's steps (its first stage) are recorded and gated like whole batches.
        """
        stages = self.model.stages
        if stages is not None:
            first, second = stages
            stages = (lambda batch: self._instrumented(first, batch), second)
        return dataclasses.replace(self.model, forward=self.forward, stages=stages)

    def shapes_run(self) -> list[tuple[int, ...]]:
        """Image shapes (H, W, C) of every image that reached the network, warm-up excluded."""
        return [batch[1:] for batch in self.batches for _ in range(batch[0])]


class ServerThread:
    """Context manager: start (and by default load) a NetVLADServer on a background loop."""

    def __init__(self, config: ServerConfig, loader: Callable[[ServerConfig], LoadedModel],
                 load: bool = True) -> None:
        self.config = config
        self.server = NetVLADServer(config, loader)
        self._load_now = load
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="server-loop",
                                        daemon=True)

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.server.port}"

    def run(self, coroutine: Coroutine[Any, Any, Any], timeout: float = 120.0) -> Any:
        """Run a coroutine on the server's loop and return its result."""
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(timeout)

    def load(self) -> None:
        """Load the model and turn SERVING."""
        self.run(self.server.load())

    def metrics_text(self) -> str:
        """The /metrics page as served over HTTP."""
        return read_metrics(f"http://127.0.0.1:{self.config.metrics_port}/metrics")

    def __enter__(self) -> ServerThread:
        self._thread.start()
        self.run(self.server.start())
        if self._load_now:
            self.load()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.run(self.server.stop(grace=5.0))
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()


def wait_for(condition: Callable[[], bool], timeout: float = 20.0, what: str = "condition") -> None:
    """Poll until condition() is true; fail the test after timeout seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


class HeldServer:
    """A real in-process server whose model thread the test can hold at a gate, with a stub to it.

    `park(request)` closes the gate and sends one request whose image then waits inside the
    model, so what the test sends next queues deterministically behind it.
    """

    def __init__(self, tiny_model: LoadedModel, **overrides: Any) -> None:
        self.model = InstrumentedModel(tiny_model)
        self.running = ServerThread(tiny_config(free_port(), **overrides), self.model.loader)

    def __enter__(self) -> HeldServer:
        self.running.__enter__()
        self.model.batches.clear()  # forget the warm-up
        self.model.entered.clear()
        self.channel = grpc.insecure_channel(self.running.target)
        self.stub = pb_grpc.DescriptorServiceStub(self.channel)
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.model.gate.set()
        self.channel.close()
        self.running.__exit__(*exc_info)

    @property
    def depth(self) -> int:
        """Images waiting in the server's queue."""
        return self.running.server.queue_depth

    def park(self, request: pb.DescribeImagesRequest, timeout: float = 60.0) -> grpc.Future:
        """Close the gate and send `request`; returns once its batch is inside the model."""
        self.model.entered.clear()
        self.model.gate.clear()
        busy = self.stub.DescribeImages.future(request, timeout=timeout)
        assert self.model.entered.wait(timeout), "the parked request never reached the model"
        return busy
