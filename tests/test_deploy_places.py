"""The place index's deployment shape: one index server with a volume, stateless describing
replicas that refuse index calls naming it (docs/PLACES.md).

Static: the StatefulSet, its Service and the describing Deployment agree with each other and
with the server's settings; compose keeps the indexes in a named volume. Real: two
netvlad-server processes, one describing replica (NETVLAD_INDEX_SERVER set as in deployment.yaml)
and the index server, with clients that see one consistent index whichever server they reach.
"""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import numpy as np
import pytest
from client_support import TINY_FLAGS, random_image, write_png
from deploy_support import assert_server_settings, compose_config, k8s_documents
from netvlad_client import NetVLADClient, NetVLADRPCError
from netvlad_client.bench.harness import ServerProcess
from netvlad_client.cli import main
from netvlad_client.places import Place

INDEX_DIR = "/var/lib/netvlad/indexes"


def container_env(container: dict) -> dict[str, str]:
    """A container's literal `env` entries."""
    return {item["name"]: item["value"] for item in container.get("env", [])}


def test_k8s_index_server_is_one_stateful_pod_with_its_own_volume():
    docs = k8s_documents()
    stateful = docs["index-statefulset.yaml"]
    assert stateful["kind"] == "StatefulSet" and stateful["spec"]["replicas"] == 1
    pod = stateful["spec"]["template"]
    container = pod["spec"]["containers"][0]
    env = container_env(container)
    assert env["NETVLAD_INDEX_DIR"] == INDEX_DIR
    assert_server_settings(env, "index-statefulset.yaml env")
    (claim,) = stateful["spec"]["volumeClaimTemplates"]
    assert claim["spec"]["accessModes"] == ["ReadWriteOnce"]
    mount = next(m for m in container["volumeMounts"] if m["name"] == claim["metadata"]["name"])
    assert mount["mountPath"] == INDEX_DIR and not mount.get("readOnly")
    assert pod["spec"]["securityContext"]["fsGroup"] == 10001  # the volume is writable
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["grpc"] == {"port": 50051}, probe

    service = docs["service-index.yaml"]
    assert stateful["spec"]["serviceName"] == service["metadata"]["name"]
    assert service["spec"]["selector"] == stateful["spec"]["selector"]["matchLabels"]
    # The describing replicas' Service never reaches the index server, and the other way round.
    describing = docs["deployment.yaml"]
    labels = pod["metadata"]["labels"]
    assert not set(docs["service-headless.yaml"]["spec"]["selector"].items()) <= set(
        labels.items())
    assert not set(service["spec"]["selector"].items()) <= set(
        describing["spec"]["template"]["metadata"]["labels"].items())


def test_k8s_describing_replicas_keep_no_indexes_and_name_the_index_server():
    docs = k8s_documents()
    container = docs["deployment.yaml"]["spec"]["template"]["spec"]["containers"][0]
    env = container_env(container)
    assert_server_settings(env, "deployment.yaml env")
    assert env["NETVLAD_INDEX_DIR"] == "off"
    service = docs["service-index.yaml"]
    port = next(p["port"] for p in service["spec"]["ports"] if p["name"] == "grpc")
    assert env["NETVLAD_INDEX_SERVER"] == f"{service['metadata']['name']}:{port}"


def test_compose_keeps_the_indexes_in_a_named_volume():
    config = compose_config("docker-compose.yml")
    netvlad = config["services"]["netvlad"]
    assert "netvlad-indexes" in config["volumes"]
    directory = netvlad["environment"]["NETVLAD_INDEX_DIR"]
    assert f"netvlad-indexes:{directory}:rw" in netvlad["volumes"]
    cpu = compose_config("docker-compose.yml", "docker-compose.cpu.yml")["services"]
    assert cpu["netvlad-cpu"]["volumes"] == cpu["netvlad"]["volumes"]


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServerProcess,
                                                                      ServerProcess]]:
    """(describing replica, index server): two real processes on demo-tiny."""
    logs = tmp_path_factory.mktemp("pair")
    env = {"TF_CPP_MIN_LOG_LEVEL": "2", "CUDA_VISIBLE_DEVICES": ""}
    index_server = ServerProcess(logs / "index.log", *TINY_FLAGS, "--index-dir",
                                 str(logs / "indexes"), env=env)
    replica = ServerProcess(logs / "replica.log", *TINY_FLAGS, env={
        **env, "NETVLAD_INDEX_DIR": "off", "NETVLAD_INDEX_SERVER": index_server.target})
    try:
        index_server.wait_serving()
        replica.wait_serving()
        yield replica, index_server
    finally:
        for server in (replica, index_server):
            server.process.terminate()
            server.process.wait(60)


def test_describing_replica_refuses_index_calls_naming_the_index_server(pair):
    replica, index_server = pair
    with NetVLADClient(replica.target, retries=0) as client:
        for call in (lambda: client.create_index("fragment", 8), client.list_indexes,
                     lambda: client.query_places("fragment", descriptor=np.ones(8) / 8 ** 0.5)):
            with pytest.raises(NetVLADRPCError) as refused:
                call()
            assert refused.value.code == grpc.StatusCode.FAILED_PRECONDITION
            assert index_server.target in str(refused.value)
            assert "--index-target" in str(refused.value)
        assert client.describe(random_image(1)).shape == (1, 32)  # describing still serves


def test_clients_of_either_server_see_one_consistent_index(pair, tmp_path, capsys):
    replica, index_server = pair
    folder = tmp_path / "kf"
    folder.mkdir()
    for i in range(6):
        write_png(folder / f"{i:03d}.png", random_image(100 + i, 24, 32))
    both = f"{replica.target},{index_server.target}"
    environ = {"NETVLAD_INDEX_TARGET": index_server.target}
    # The CLI reaches the describing replicas round-robin and the index server for index calls.
    assert main(["--target", both, "index", "create", "shared", "--dims", "8"], environ) == 0
    assert main(["--target", both, "index", "add", "shared", str(folder), "--id", "stem"],
                environ) == 0
    assert "added 6 places" in capsys.readouterr().err
    # Adds from a second client, several of them in a row, all land in the same index.
    rows = np.random.default_rng(0).standard_normal((20, 8)).astype(np.float32)
    rows /= np.linalg.norm(rows, axis=1, keepdims=True)
    with NetVLADClient(index_server.target) as client:
        for start in range(0, 20, 5):
            client.add_places("shared", [Place(f"d{start + i}", descriptor=row)
                                         for i, row in enumerate(rows[start:start + 5])])
        (info,) = [i for i in client.list_indexes() if i.name == "shared"]
        assert info.size == 26
        best = client.query_places("shared", descriptor=rows[7], k=1)
        assert best[0].id == "d7" and best[0].similarity == pytest.approx(1.0, abs=1e-5)
    # Round-robin over both servers: describing is spread, index calls never land on the
    # replica; the answers always come from the one index.
    with NetVLADClient([replica.target, index_server.target], retries=0) as client:
        outcomes = []
        for _ in range(6):
            try:
                outcomes.append(len(client.export_places("shared").ids))
            except NetVLADRPCError as exc:
                assert exc.code == grpc.StatusCode.FAILED_PRECONDITION
                outcomes.append("refused")
        assert set(outcomes) == {26, "refused"}, outcomes
    assert main(["--target", replica.target, "index", "query", "shared",
                 str(folder / "003.png"), "-k", "1", "--json"], environ) == 0
    assert '"id": "003"' in capsys.readouterr().out
