"""Place indexes across real server processes: kill -9, torn logs, damaged snapshots, weights.

Every acknowledged add survives `kill -9` at any moment and nothing unsent appears; a restart
restores every place bit for bit; a torn last log record is dropped with a warning; a damaged
snapshot refuses that index only; an index made with other weights is refused, never mixed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
from client_support import ServerProcess
from netvlad_client import NetVLADClient, NetVLADRPCError
from netvlad_client.bench.harness import free_port
from netvlad_client.places import Place, PlaceArrays
from netvlad_server.main import load_model
from server_thread import ServerThread, tiny_config

DIMS = 16


def start(tmp_path: Path, index_dir: Path, name: str, *flags: str) -> ServerProcess:
    server = ServerProcess(free_port(), free_port(), tmp_path / f"{name}.log",
                           "--index-dir", str(index_dir), *flags)
    return server.wait_serving()


def unit_rows(count: int, seed: int = 0) -> np.ndarray:
    rows = np.random.default_rng(seed).standard_normal((count, DIMS)).astype(np.float32)
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def assert_same(a: PlaceArrays, b: PlaceArrays) -> None:
    assert a.ids == b.ids and a.metadata == b.metadata
    for name in ("descriptors", "timestamps", "positions"):
        assert getattr(a, name).tobytes() == getattr(b, name).tobytes(), name


def test_kill_9_during_adds_keeps_every_acknowledged_place(tiny_model, tmp_path):
    index_dir = tmp_path / "indexes"
    rows = unit_rows(4000)
    acknowledged: set[int] = set()
    sent: set[int] = set()
    # A small compaction size: snapshots are written (and interrupted) while adds go on.
    server = start(tmp_path, index_dir, "first", "--index-compact-bytes", "20000")
    with NetVLADClient(server.target, timeout=10, retries=0) as client:
        client.create_index("run", DIMS)

        def adder(worker: int) -> None:
            for start_row in range(worker * 3, len(rows), 24):
                batch = range(start_row, min(start_row + 3, len(rows)))
                sent.update(batch)
                try:
                    client.add_places("run", [Place(f"p{i}", descriptor=rows[i],
                                                    timestamp=i / 10, metadata={"i": str(i)})
                                              for i in batch])
                except NetVLADRPCError:
                    return
                acknowledged.update(batch)

        threads = [threading.Thread(target=adder, args=(w,)) for w in range(8)]
        for thread in threads:
            thread.start()
        deadline = time.monotonic() + 30
        while len(acknowledged) < 600 and time.monotonic() < deadline:
            time.sleep(0.01)
        server.process.kill()  # SIGKILL: no drain, no flush
        server.process.wait()
        for thread in threads:
            thread.join()
    assert len(acknowledged) >= 600, server.tail()
    assert "snapshot" in server.log.read_text()

    server = start(tmp_path, index_dir, "second")
    with NetVLADClient(server.target, timeout=10) as client:
        restored = client.export_places("run")
        ids = {int(i[1:]) for i in restored.ids}
        assert acknowledged <= ids, f"lost {sorted(acknowledged - ids)[:10]}"
        assert ids <= sent, f"invented {sorted(ids - sent)[:10]}"
        order = [int(i[1:]) for i in restored.ids]
        assert restored.descriptors.tobytes() == rows[order].tobytes()
        assert restored.metadata == [{"i": str(i)} for i in order]
        assert restored.timestamps.tolist() == [i / 10 for i in order]
        client.remove_places("run", restored.ids[:5])
        client.add_places("run", [Place("late", descriptor=rows[0], position=(1.0, 2.0, 3.0))])
        before = client.export_places("run")
    assert server.stop() == 0

    with in_process(tiny_model, index_dir) as client:
        assert_same(client.export_places("run"), before)  # bit for bit


@contextlib.contextmanager
def in_process(model, index_dir: Path, **overrides):
    """An in-process server on index_dir; `model` a LoadedModel or a weights path to load."""
    config = tiny_config(free_port(), index_dir=str(index_dir), **overrides)
    if isinstance(model, Path):
        config, loader = dataclasses.replace(config, model=str(model)), load_model
    else:
        def loader(_config):
            return model
    with ServerThread(config, loader) as running, \
            NetVLADClient(running.target, timeout=10) as client:
        yield client


def test_torn_log_tail_and_damaged_snapshot(tiny_model, tmp_path, caplog):
    index_dir = tmp_path / "indexes"
    rows = unit_rows(60, seed=1)
    with in_process(tiny_model, index_dir, index_compact_bytes=3000) as client:
        client.create_index("torn", DIMS)
        client.create_index("broken", DIMS)
        for i in range(3):
            client.add_places("torn", [Place(f"t{i}", descriptor=rows[i])])
        for start_row in range(10, 60, 10):
            client.add_places("broken", [Place(f"b{i}", descriptor=rows[i])
                                         for i in range(start_row, start_row + 10)])
        torn_before = client.export_places("torn")
    log = index_dir / "torn" / "log-00000000.wal"
    with open(log, "ab") as handle:  # a record cut short by a crash: header and some payload
        handle.write((500).to_bytes(4, "little") + b"\x01\x02\x03\x04" + b"A" * 10)
    snapshots = sorted((index_dir / "broken").glob("snapshot-*.npz"))
    assert snapshots, "the small --index-compact-bytes should have written a snapshot"
    damaged = bytearray(snapshots[-1].read_bytes())
    damaged[len(damaged) // 2] ^= 0xFF
    snapshots[-1].write_bytes(bytes(damaged))
    files_before = {p.name: p.read_bytes() for p in (index_dir / "broken").iterdir()}

    with caplog.at_level(logging.INFO), in_process(tiny_model, index_dir) as client:
        assert "dropped a torn record at the end of" in caplog.text
        assert "place index broken not loaded: snapshot" in caplog.text
        assert "is damaged" in caplog.text
        assert_same(client.export_places("torn"), torn_before)
        client.add_places("torn", [Place("t3", descriptor=rows[3])])
        infos = {info.name: info for info in client.list_indexes()}
        assert "damaged" in infos["broken"].error and infos["torn"].size == 4
        with pytest.raises(NetVLADRPCError, match="failed to load at start-up") as caught:
            client.query_places("broken", descriptor=rows[10])
        assert caught.value.code == grpc.StatusCode.FAILED_PRECONDITION
        with pytest.raises(NetVLADRPCError, match="already exists"):
            client.create_index("broken", DIMS)
        torn_after = client.export_places("torn")
    assert {p.name: p.read_bytes() for p in (index_dir / "broken").iterdir()} == files_before
    caplog.clear()
    with caplog.at_level(logging.INFO), in_process(tiny_model, index_dir) as client:
        assert "torn record" not in caplog.text
        assert_same(client.export_places("torn"), torn_after)


def test_index_of_other_weights_is_refused(tiny_model, tmp_path):
    from netvlad_server.weights import demo_weights, save_export

    index_dir = tmp_path / "indexes"
    rows = unit_rows(5, seed=2)
    with in_process(tiny_model, index_dir) as client:
        made = client.create_index("map", DIMS)
        client.add_places("map", [Place(f"p{i}", descriptor=r) for i, r in enumerate(rows)])
        client.export_npz("map", tmp_path / "map.npz")
    other = tmp_path / "other.npz"
    save_export(demo_weights("tiny", seed=1), other)

    with in_process(other, index_dir) as client:
        theirs = client.place_limits().server_model.weights_sha256
        assert theirs != made.weights_sha256
        for call in (lambda: client.add_places("map", [Place("x", descriptor=rows[0])]),
                     lambda: client.query_places("map", descriptor=rows[0]),
                     lambda: client.query_and_add("map", Place("y", descriptor=rows[0]))):
            with pytest.raises(NetVLADRPCError) as caught:
                call()
            assert caught.value.code == grpc.StatusCode.FAILED_PRECONDITION
            assert made.weights_sha256[:16] in str(caught.value)
            assert theirs[:16] in str(caught.value)
        assert {i.name: i.size for i in client.list_indexes()} == {"map": 5}
        client.create_index("fresh", DIMS)
        with pytest.raises(NetVLADRPCError, match="made with weights sha256") as caught:
            client.import_npz("fresh", tmp_path / "map.npz")
        assert caught.value.code == grpc.StatusCode.FAILED_PRECONDITION
        assert {i.name: i.size for i in client.list_indexes()} == {"fresh": 0, "map": 5}
