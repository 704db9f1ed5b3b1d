"""Shared fixtures: tiny weights (fast real forward passes) and loopback ports."""

from __future__ import annotations

import pytest
from netvlad_client.bench.harness import free_port


@pytest.fixture(scope="session")
def tiny_weights():
    """Deterministic tiny-shape weights (8-channel convs, K=4, 32-D output)."""
    from netvlad_server.weights import demo_weights

    return demo_weights("tiny", seed=0)


@pytest.fixture(scope="session")
def tiny_model():
    """The tiny demo model as netvlad-server loads it (float32), for in-process servers."""
    from netvlad_server.main import load_model
    from server_thread import tiny_config

    return load_model(tiny_config(0))


@pytest.fixture(scope="session")
def network(tiny_weights):
    """A NetVLADNetwork of the tiny weights, for direct reference calls."""
    from netvlad_server.network import NetVLADNetwork

    return NetVLADNetwork(tiny_weights)


@pytest.fixture(scope="session")
def tiny_server_process(tmp_path_factory):
    """A real netvlad-server subprocess (demo-tiny, 127.0.0.1, 4 images/request), with /metrics."""
    from client_support import ServerProcess

    log = tmp_path_factory.mktemp("tiny-server") / "server.log"
    server = ServerProcess(free_port(), free_port(), log, "--max-images-per-request", "4")
    try:
        yield server.wait_serving()
    finally:
        server.stop()
