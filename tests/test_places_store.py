"""The place index's storage and engine without a server: log records, snapshots, start-up.

Damage in the middle of a log refuses the index; a torn or zero-filled tail is cut; a crash
between the steps of a compaction leaves a loadable directory; removals keep the search exact.
"""

from __future__ import annotations

import numpy as np
import pytest
from netvlad_server.places.engine import IndexMeta, PlaceIndex, PlaceRows
from netvlad_server.places.limits import ModelIdentity
from netvlad_server.places.store import (
    StoreError,
    create_index_dir,
    encode_add,
    encode_remove,
    index_dirs,
    open_index_dir,
    write_snapshot,
)

DIMS = 8
META = IndexMeta("m", DIMS, "exact", ModelIdentity("ab" * 32, "float32", 32, "tiny"))


def rows(start: int, count: int) -> PlaceRows:
    vectors = np.random.default_rng(start).standard_normal((count, DIMS)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    return PlaceRows([f"p{i}" for i in range(start, start + count)], vectors,
                     np.arange(start, start + count, dtype=np.float64),
                     np.full((count, 3), np.nan), [{"i": str(i)} for i in range(count)])


def written(tmp_path, *payloads: bytes):
    store = create_index_dir(tmp_path, META)
    for payload in payloads:
        store.append(payload)
    store.sync()
    store.close()
    return tmp_path / "m" / "log-00000000.wal"


def test_log_replays_adds_and_removes_in_order(tmp_path):
    written(tmp_path, encode_add(rows(0, 5)), encode_remove(["p1", "p9"]), encode_add(rows(5, 2)))
    index, store = open_index_dir(tmp_path / "m")
    store.close()
    assert index.rows().ids == ["p0", "p2", "p3", "p4", "p5", "p6"]


@pytest.mark.parametrize("tail", [b"\x07\x00", b"\x00" * 64, (99).to_bytes(4, "little") + b"xx"])
def test_a_torn_or_zero_filled_tail_is_cut(tmp_path, tail, caplog):
    log = written(tmp_path, encode_add(rows(0, 3)))
    size = log.stat().st_size
    with open(log, "ab") as handle:
        handle.write(tail)
    index, store = open_index_dir(tmp_path / "m")
    store.close()
    assert index.size == 3 and log.stat().st_size == size
    assert "dropped a torn record" in caplog.text


def test_damage_before_the_last_record_refuses_the_index(tmp_path):
    log = written(tmp_path, encode_add(rows(0, 3)), encode_add(rows(3, 3)))
    data = bytearray(log.read_bytes())
    data[20] ^= 0x01
    log.write_bytes(bytes(data))
    with pytest.raises(StoreError, match="damaged record at byte 0 followed by more data"):
        open_index_dir(tmp_path / "m")


def test_interrupted_compaction_and_leftovers_load_cleanly(tmp_path):
    log = written(tmp_path, encode_add(rows(0, 4)))
    directory = log.parent
    # The crash came after snapshot 1 was renamed into place, before log 1 and the cleanup.
    write_snapshot(directory / "snapshot-00000001.npz", META, rows(0, 4))
    (directory / ".snapshot-00000002.npz.tmp-1").write_bytes(b"half")
    (tmp_path / ".other.creating").mkdir()
    assert index_dirs(tmp_path) == [directory]
    index, store = open_index_dir(directory)
    assert index.size == 4 and store.generation == 1
    assert sorted(p.name for p in directory.iterdir()) == [
        "index.json", "log-00000001.wal", "snapshot-00000001.npz"]
    store.close()


def test_a_snapshot_of_another_index_is_refused(tmp_path):
    written(tmp_path)
    other = IndexMeta("m", DIMS, "hnsw", META.model)
    write_snapshot(tmp_path / "m" / "snapshot-00000001.npz", other, rows(0, 2))
    with pytest.raises(StoreError, match="belongs to another index"):
        open_index_dir(tmp_path / "m")


@pytest.mark.parametrize("method", ["exact", "hnsw"])
def test_search_after_replacements_and_removals_equals_brute_force(method):
    index = PlaceIndex(IndexMeta("m", DIMS, method, META.model))
    data = rows(0, 60)
    index.add(data)
    index.remove([f"p{i}" for i in range(0, 60, 3)])
    replaced = rows(100, 5)
    replaced.ids = ["p1", "p2", "p4", "p5", "new"]
    assert index.add(replaced) == ["p1", "p2", "p4", "p5"]
    kept = index.rows()
    assert kept.ids[-5:] == replaced.ids and index.size == 41
    for query in rows(200, 5).vectors:
        expected = np.argsort(-(kept.vectors @ query), kind="stable")[:5]
        found = index.search(query, 5)
        assert [f.id for f in found] == [kept.ids[i] for i in expected]
