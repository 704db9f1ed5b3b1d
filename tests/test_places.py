"""The place index through a real in-process server (demo-tiny) and the client library.

Search equals brute force, temporal exclusion, replacement of duplicate ids, every bad input
refused with a clear message while the server keeps serving, the keyframe stream answering in
order with a bad frame in its own message, concurrent adds and queries, export and import.
"""

from __future__ import annotations

import asyncio
import dataclasses
import threading

import grpc
import numpy as np
import pytest
from client_support import random_image, write_png
from netvlad_client import AsyncNetVLADClient, NetVLADClient, NetVLADRPCError
from netvlad_client.bench.harness import free_port
from netvlad_client.formats import read_descriptors
from netvlad_client.places import Place, PlaceArrays
from server_thread import ServerThread, tiny_config

DIMS = 16


def unit_rows(count: int, dims: int = DIMS, seed: int = 0) -> np.ndarray:
    rows = np.random.default_rng(seed).standard_normal((count, dims)).astype(np.float32)
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def brute_force(rows: np.ndarray, query: np.ndarray, k: int, keep: np.ndarray | None = None
                ) -> list[int]:
    similarities = rows.astype(np.float64) @ query.astype(np.float64)
    if keep is not None:
        similarities[~keep] = -np.inf
    order = np.argsort(-similarities, kind="stable")
    return [int(i) for i in order[:k] if np.isfinite(similarities[i])]


@pytest.fixture(scope="module")
def server(tiny_model, tmp_path_factory):
    config = tiny_config(free_port(), index_dir=str(tmp_path_factory.mktemp("indexes")))
    with ServerThread(config, lambda _config: tiny_model) as running:
        yield running


@pytest.fixture()
def client(server):
    with NetVLADClient(server.target, timeout=30) as made:
        yield made


_names = iter(range(10**6))


@pytest.fixture()
def index(client):
    name = f"map{next(_names)}"
    client.create_index(name, DIMS)
    return name


def add_rows(client, index, rows, **columns):
    places = [Place(f"p{i}", descriptor=row, timestamp=float(i), metadata={"n": str(i)},
                    **{key: value[i] for key, value in columns.items()})
              for i, row in enumerate(rows)]
    return client.add_places(index, places, batch_size=50)


def test_query_equals_brute_force(client, index):
    rows = unit_rows(300)
    assert add_rows(client, index, rows).size == 300
    for query in unit_rows(8, seed=1):
        found = client.query_places(index, descriptor=query, k=10)
        expected = brute_force(rows, query, 10)
        assert [m.id for m in found] == [f"p{i}" for i in expected]
        np.testing.assert_allclose([m.similarity for m in found], rows[expected] @ query,
                                   atol=1e-6)
        assert found[0].metadata == {"n": expected[0].__str__()}
        assert found[0].timestamp == float(expected[0])


def test_min_similarity_and_exclusions_equal_brute_force(client, index):
    rows = unit_rows(200, seed=2)
    add_rows(client, index, rows)
    query = rows[100]
    times = np.arange(200.0)
    found = client.query_places(index, descriptor=query, timestamp=100.0,
                                exclude_within_seconds=5, k=20)
    keep = np.abs(times - 100.0) > 5
    assert [m.id for m in found] == [f"p{i}" for i in brute_force(rows, query, 20, keep)]
    assert all(abs(m.timestamp - 100.0) > 5 for m in found)
    found = client.query_places(index, descriptor=rows[199], exclude_last=30, k=5)
    keep = np.arange(200) < 170
    assert [m.id for m in found] == [f"p{i}" for i in brute_force(rows, rows[199], 5, keep)]
    found = client.query_places(index, descriptor=query, k=200, min_similarity=0.2)
    assert found and all(m.similarity >= 0.2 for m in found)
    assert len(found) == int(np.sum(rows @ query >= 0.2))


def test_hnsw_index_finds_the_exact_neighbours(client):
    client.create_index("approx", DIMS, method="hnsw")
    rows = unit_rows(500, seed=3)
    add_rows(client, "approx", rows)
    hits = 0
    queries = unit_rows(20, seed=4)
    for query in queries:
        found = {m.id for m in client.query_places("approx", descriptor=query, k=5)}
        hits += len(found & {f"p{i}" for i in brute_force(rows, query, 5)})
    assert hits / (5 * len(queries)) >= 0.9
    assert client.remove_places("approx", ["p0", "p1"]) == (2, [])
    assert "p0" not in {m.id for m in client.query_places("approx", descriptor=rows[0], k=3)}


def test_image_places_are_described_like_describe(client, index, tmp_path):
    pixels = random_image(7)
    path = write_png(tmp_path / "frame.png", pixels)
    client.add_places(index, [Place("img", image=path, position=(1.0, 2.0, 3.0))])
    client.add_places(index, [Place("other", descriptor=unit_rows(1, seed=9)[0])])
    described = client.describe(path, dims=DIMS)[0]
    exported = client.export_places(index)
    np.testing.assert_allclose(exported.descriptors[0], described, atol=1e-5)
    found = client.query_places(index, pixels, k=2)
    assert found[0].id == "img" and found[0].similarity == pytest.approx(1.0, abs=1e-5)
    assert found[0].position == (1.0, 2.0, 3.0) and found[0].timestamp is None


def test_duplicate_id_replaces_and_says_so(client, index):
    first, second = unit_rows(2, seed=5)
    client.add_places(index, [Place("a", descriptor=first), Place("b", descriptor=second)])
    result = client.add_places(index, [Place("a", descriptor=second, metadata={"v": "2"})])
    assert result.replaced == ["a"] and result.size == 2
    found = client.query_places(index, descriptor=second, k=2)
    assert {m.id for m in found} == {"a", "b"}
    assert next(m for m in found if m.id == "a").metadata == {"v": "2"}
    assert client.export_places(index).ids == ["b", "a"]  # the replacement is the newest


def test_remove_places(client, index):
    add_rows(client, index, unit_rows(10, seed=6))
    assert client.remove_places(index, ["p3", "p4", "nope"]) == (2, ["nope"])
    assert client.export_places(index).ids == [f"p{i}" for i in (0, 1, 2, 5, 6, 7, 8, 9)]


BAD = [
    ("unknown index", dict(index="nowhere"), grpc.StatusCode.NOT_FOUND, "no index named"),
    ("wrong dims", dict(descriptor=np.ones(DIMS + 1) / np.sqrt(DIMS + 1)),
     grpc.StatusCode.INVALID_ARGUMENT, f"holds {DIMS}-value descriptors"),
    ("NaN", dict(descriptor=np.full(DIMS, np.nan)), grpc.StatusCode.INVALID_ARGUMENT,
     "NaN or infinite"),
    ("not unit", dict(descriptor=np.ones(DIMS)), grpc.StatusCode.INVALID_ARGUMENT, "not 1"),
    ("empty id", dict(place_id=""), grpc.StatusCode.INVALID_ARGUMENT, "the place id is empty"),
    ("metadata", dict(metadata={"k": "x" * 5000}), grpc.StatusCode.INVALID_ARGUMENT,
     "--max-place-metadata-bytes"),
    ("timestamp", dict(timestamp=float("inf")), grpc.StatusCode.INVALID_ARGUMENT,
     "finite number"),
]


@pytest.mark.parametrize(("what", "change", "code", "words"), BAD, ids=[b[0] for b in BAD])
def test_bad_adds_are_refused_clearly(client, index, what, change, code, words):
    change = dict(change)
    target = change.pop("index", index)
    place = Place(change.pop("place_id", "x"), descriptor=change.pop(
        "descriptor", unit_rows(1)[0]), **change)
    with pytest.raises(NetVLADRPCError) as caught:
        client.add_places(target, [place])
    assert caught.value.code == code and words in str(caught.value)
    assert client.list_indexes()  # still serving
    if target == index:
        assert client.export_places(index).ids == []


@pytest.mark.parametrize(("k", "words"), [(0, "k is 0"), (10**6, "exceeds the limit of 1000")])
def test_bad_k_is_refused(client, index, k, words):
    with pytest.raises(NetVLADRPCError, match=words) as caught:
        client.query_places(index, descriptor=unit_rows(1)[0], k=k)
    assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT


def test_bad_queries_are_refused(client, index):
    with pytest.raises(NetVLADRPCError, match="needs the query's timestamp"):
        client.query_places(index, descriptor=unit_rows(1)[0], exclude_within_seconds=3)
    with pytest.raises(NetVLADRPCError, match="has 3 values") as caught:
        client.query_places(index, descriptor=[1.0, 0.0, 0.0])
    assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(NetVLADRPCError, match="no index named 'gone'") as caught:
        client.query_places("gone", descriptor=unit_rows(1)[0])
    assert caught.value.code == grpc.StatusCode.NOT_FOUND
    with pytest.raises(NetVLADRPCError, match="index name") as caught:
        client.create_index("../escape")
    with pytest.raises(NetVLADRPCError, match="exceeds the model's 32") as caught:
        client.create_index("big", 33)
    with pytest.raises(NetVLADRPCError, match="already exists"):
        client.create_index(index, 8)
    assert client.create_index(index, DIMS, exist_ok=True).name == index


def test_stream_answers_in_order_with_a_bad_frame_in_its_own_message(client, index, tmp_path):
    rows = unit_rows(6, seed=8)
    frames = [Place(f"k{i}", descriptor=row, timestamp=float(i)) for i, row in enumerate(rows)]
    frames[3] = Place("k3", descriptor=np.full(DIMS, np.nan))
    frames[4] = Place("k4", image=write_png(tmp_path / "k4.png", random_image(4)), timestamp=4.0)
    frames.append(Place("k6", descriptor=rows[0], timestamp=6.0))
    answers = list(client.loop_closure_stream(index, frames, k=3, exclude_last=1))
    assert [a.sequence for a in answers] == list(range(7))
    assert [a.id for a in answers] == [f.id for f in frames]
    assert [a.ok for a in answers] == [True, True, True, False, True, True, True]
    assert answers[3].error.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "NaN" in answers[3].error.details
    assert answers[0].matches == [] and [m.id for m in answers[1].matches] == []
    assert answers[6].matches[0].id == "k0"  # the loop closes on the first keyframe
    assert all(m.id != "k5" for m in answers[6].matches)  # the last one added is skipped
    assert answers[6].size == 6 and "k3" not in client.export_places(index).ids


def test_query_and_add(client, index):
    row = unit_rows(1, seed=11)[0]
    first = client.query_and_add(index, Place("a", descriptor=row), k=3)
    assert first.matches == [] and first.size == 1 and not first.replaced
    again = client.query_and_add(index, Place("a", descriptor=row), k=3)
    assert [m.id for m in again.matches] == ["a"] and again.replaced and again.size == 1


def test_concurrent_adds_and_queries_see_whole_places(client, index):
    rows = unit_rows(400, seed=12)
    errors: list[BaseException] = []
    stop = threading.Event()

    def adder(worker: int) -> None:
        for i in range(worker, 400, 8):
            client.add_places(index, [Place(f"p{i}", descriptor=rows[i], metadata={"i": str(i)},
                                            timestamp=float(i))])

    def querier() -> None:
        while not stop.is_set():
            for m in client.query_places(index, descriptor=rows[0], k=20):
                i = int(m.id[1:])
                if m.metadata != {"i": str(i)} or m.timestamp != float(i) or abs(
                        m.similarity - float(rows[i] @ rows[0])) > 1e-5:
                    errors.append(AssertionError(f"half a place: {m}"))

    def guarded(work, *args) -> None:
        try:
            work(*args)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=guarded, args=(querier,)) for _ in range(3)]
    adders = [threading.Thread(target=guarded, args=(adder, w)) for w in range(8)]
    for thread in threads + adders:
        thread.start()
    for thread in adders:
        thread.join()
    stop.set()
    for thread in threads:
        thread.join()
    assert not errors, errors[:3]
    exported = client.export_places(index)
    assert sorted(exported.ids) == sorted(f"p{i}" for i in range(400))
    order = [int(i[1:]) for i in exported.ids]
    np.testing.assert_array_equal(exported.descriptors, rows[order])


def test_export_npz_is_read_by_numpy_and_evaluate_and_imports(client, index, tmp_path):
    rows = unit_rows(20, seed=13)
    positions = [(float(i), 0.5, -1.0) for i in range(20)]
    add_rows(client, index, rows, position=positions)
    path = tmp_path / "map.npz"
    assert client.export_npz(index, path) == 20
    with np.load(path) as archive:
        assert list(archive["ids"]) == [f"p{i}" for i in range(20)]
        np.testing.assert_array_equal(archive["descriptors"], rows)
        np.testing.assert_array_equal(archive["timestamps"], np.arange(20.0))
        np.testing.assert_array_equal(archive["positions"], np.array(positions))
    read = read_descriptors(path)  # what evaluate --descriptors reads
    np.testing.assert_array_equal(read.values, rows)
    assert read.names == [f"p{i}" for i in range(20)]
    client.create_index(f"{index}-copy", DIMS)
    assert client.import_npz(f"{index}-copy", path).added == 20
    copy = client.export_places(f"{index}-copy")
    original = client.export_places(index)
    for field in dataclasses.fields(PlaceArrays):
        a, b = getattr(copy, field.name), getattr(original, field.name)
        assert np.array_equal(a, b, equal_nan=True) if isinstance(a, np.ndarray) else a == b


def test_list_drop_health_and_metrics(client, server, index):
    add_rows(client, index, unit_rows(5))
    info = next(i for i in client.list_indexes() if i.name == index)
    assert (info.size, info.dims, info.method, info.precision) == (5, DIMS, "exact", "float32")
    assert info.bytes >= 5 * DIMS * 4 and len(info.weights_sha256) == 64
    assert client.health("netvlad.v1.PlaceIndexService") == "SERVING"
    text = server.metrics_text()
    assert f'netvlad_place_index_places{{index="{index}"}} 5.0' in text
    assert "netvlad_place_query_seconds_count" in text and "netvlad_place_add_seconds" in text
    assert client.drop_index(index) == 5
    assert index not in {i.name for i in client.list_indexes()}
    assert f'index="{index}"' not in server.metrics_text()


def test_async_client(server, tmp_path):
    async def run() -> None:
        async with AsyncNetVLADClient(server.target, timeout=30) as client:
            await client.create_index("async", DIMS)
            rows = unit_rows(5, seed=14)
            await client.add_places("async", [Place(f"a{i}", descriptor=r)
                                              for i, r in enumerate(rows)])
            found = await client.query_places("async", descriptor=rows[2], k=1)
            assert found[0].id == "a2"
            answers = [a async for a in client.loop_closure_stream(
                "async", [Place("s", descriptor=rows[2])], k=1)]
            assert answers[0].matches[0].id == "a2"
            assert await client.export_npz("async", tmp_path / "a.npz") == 6
            assert await client.drop_index("async") == 6

    asyncio.run(run())


def test_limits_refuse_with_resource_exhausted(tiny_model, tmp_path):
    config = tiny_config(free_port(), index_dir="off", max_indexes=2, max_places_per_request=4,
                         max_index_bytes=20_000)
    with ServerThread(config, lambda _config: tiny_model) as running, \
            NetVLADClient(running.target, timeout=30) as client:
        client.create_index("one", DIMS)
        client.create_index("two", DIMS)
        with pytest.raises(NetVLADRPCError, match="--max-indexes") as caught:
            client.create_index("three", DIMS)
        assert caught.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        rows = unit_rows(200)
        with pytest.raises(NetVLADRPCError, match="--max-places-per-request") as caught:
            client.add_places("one", [Place(f"p{i}", descriptor=rows[i]) for i in range(5)],
                              batch_size=5)
        assert caught.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        with pytest.raises(NetVLADRPCError, match="--max-index-bytes") as caught:
            for start in range(0, 200, 4):
                client.add_places("one", [Place(f"p{i}", descriptor=rows[i])
                                          for i in range(start, start + 4)])
        assert caught.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        kept = client.export_places("one")
        assert len(kept.ids) % 4 == 0 and kept.ids == [f"p{i}" for i in range(len(kept.ids))]
        assert "IN MEMORY" not in str(client.list_indexes())
        assert client.place_limits().limits.durable is False
        assert running.metrics_text().count("netvlad_place_refused_total") >= 2


def test_contract_names():
    from netvlad_client._proto import places_pb2

    assert places_pb2.DESCRIPTOR.package == "netvlad.v1"
    service = places_pb2.DESCRIPTOR.services_by_name["PlaceIndexService"]
    methods = {m.name: m for m in service.methods}
    assert set(methods) == {"CreateIndex", "ListIndexes", "DropIndex", "AddPlaces",
                            "QueryPlaces", "QueryAndAdd", "StreamLoopClosure", "RemovePlaces",
                            "ExportPlaces"}
    stream = methods["StreamLoopClosure"]
    assert stream.client_streaming and stream.server_streaming
    assert methods["ExportPlaces"].server_streaming
    place = places_pb2.Place.DESCRIPTOR
    assert [f.name for f in place.oneofs_by_name["source"].fields] == ["image", "descriptor"]
    assert place.fields_by_name["timestamp"].has_presence


def test_reflection_lists_the_place_service(server):
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    with grpc.insecure_channel(server.target) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        answer = next(stub.ServerReflectionInfo(iter([request])))
    names = {s.name for s in answer.list_services_response.service}
    assert "netvlad.v1.PlaceIndexService" in names
