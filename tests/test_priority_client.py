"""Priority classes from the client side, against real servers (demo-tiny, 127.0.0.1).

Which class a request travelled in is read back from the server's per-class counter
`netvlad_class_requests_total{class,method,code}`; ordering under a held model is shown in
tests/test_priority.py, so here each test only needs to know the class each request carried.
"""

from __future__ import annotations

import asyncio
import dataclasses

import numpy as np
import pytest
from client_support import random_image, reference, write_png
from conftest import free_port
from netvlad_client import (
    AsyncNetVLADClient,
    ClientConfig,
    NetVLADClient,
    NetVLADInputError,
    bulk_priority,
    describe_concurrently,
    queue_budget,
    queue_safe_concurrency,
)
from netvlad_client._proto import netvlad_pb2 as pb
from netvlad_client.cli import main as cli_main
from prometheus_client.parser import text_string_to_metric_families
from server_thread import ServerThread, tiny_config, wait_for

TIMEOUT = 60.0


def class_counts(running: ServerThread) -> dict[tuple[str, str], float]:
    """OK requests (calls and stream frames) per (class, method) from the server's /metrics."""
    counts: dict[tuple[str, str], float] = {}
    for family in text_string_to_metric_families(running.metrics_text()):
        for sample in family.samples:
            if sample.name == "netvlad_class_requests_total" and sample.labels["code"] == "OK":
                key = (sample.labels["class"], sample.labels["method"])
                counts[key] = counts.get(key, 0.0) + sample.value
    return counts


class Counted:
    """Counts of OK requests per class and method made since the last `new()`."""

    def __init__(self, running: ServerThread) -> None:
        self.running = running
        self.before = class_counts(running)

    def new(self, expected: dict[tuple[str, str], float]) -> dict[tuple[str, str], float]:
        """Wait until the counters grew by `expected` (metrics land just after the answer)."""

        def grown() -> dict[tuple[str, str], float]:
            now = class_counts(self.running)
            return {key: now[key] - self.before.get(key, 0.0) for key in now
                    if now[key] != self.before.get(key, 0.0)}

        try:
            wait_for(lambda: grown() == expected, timeout=10, what=f"counts {expected}")
        finally:
            delta = grown()
            self.before = class_counts(self.running)
        return delta


DESCRIBE, STREAM = "DescribeImages", "StreamDescribeImages"


@pytest.fixture(scope="module")
def server(tiny_model):
    """Interactive by default; a bulk budget (16) smaller than the interactive one (64)."""
    config = tiny_config(free_port(), max_images_per_request=4, max_bulk_queue_size=16)
    with ServerThread(config, lambda _config: tiny_model) as running:
        yield running


@pytest.fixture(scope="module")
def bulk_default_server(tiny_model):
    """A server whose requests without a class are bulk (--default-priority bulk)."""
    config = tiny_config(free_port(), default_priority="bulk")
    with ServerThread(config, lambda _config: tiny_model) as running:
        yield running


def test_a_call_carries_its_priority_and_the_client_default(server):
    counted = Counted(server)
    image = random_image(1)
    with NetVLADClient(server.target, timeout=TIMEOUT) as client:
        np.testing.assert_allclose(client.describe(image, priority="bulk")[0], reference(image),
                                   atol=1e-6)
        assert counted.new({("bulk", DESCRIBE): 1})
        client.describe(image)  # no class named: the server's default (interactive)
        assert counted.new({("interactive", DESCRIBE): 1})
        client.describe(image, priority=pb.PRIORITY_BULK)  # the proto enum value works too
        assert counted.new({("bulk", DESCRIBE): 1})
    with NetVLADClient(server.target, timeout=TIMEOUT, priority="bulk") as client:
        client.describe([image] * 6)  # two requests (4 images a request), both bulk
        assert counted.new({("bulk", DESCRIBE): 2})
        client.describe(image, priority="interactive")  # a call overrides the client's class
        assert counted.new({("interactive", DESCRIBE): 1})
        list(client.describe_stream([image, image]))  # the client's class reaches the frames
        assert counted.new({("bulk", STREAM): 2})


def test_a_default_server_class_applies_only_to_requests_that_name_none(bulk_default_server):
    counted = Counted(bulk_default_server)
    image = random_image(2)
    with NetVLADClient(bulk_default_server.target, timeout=TIMEOUT) as client:
        assert client.info().default_priority == pb.PRIORITY_BULK
        client.describe(image)  # PRIORITY_UNSPECIFIED: the server's default class
        assert counted.new({("bulk", DESCRIBE): 1})
        client.describe(image, priority="default")
        assert counted.new({("bulk", DESCRIBE): 1})
        # A stream is someone waiting for each answer: interactive unless told otherwise.
        results = list(client.describe_stream([image, random_image(3)]))
        assert [r.ok for r in results] == [True, True]
        assert counted.new({("interactive", STREAM): 2})
        list(client.describe_stream([image], priority="bulk"))
        assert counted.new({("bulk", STREAM): 1})


def test_the_async_client_carries_priorities_too(server):
    counted = Counted(server)
    image = random_image(4)

    async def calls() -> None:
        async with AsyncNetVLADClient(server.target, timeout=TIMEOUT) as client:
            rows = await client.describe([image] * 8, priority="bulk", concurrency=2)
            np.testing.assert_allclose(rows, np.stack([reference(image)] * 8), atol=1e-6)
            assert counted.new({("bulk", DESCRIBE): 2})
            await client.describe(image)
            assert counted.new({("interactive", DESCRIBE): 1})
            assert [r.ok async for r in client.describe_stream([image])] == [True]
            assert counted.new({("interactive", STREAM): 1})
        async with AsyncNetVLADClient(server.target, timeout=TIMEOUT, priority="bulk") as client:
            assert [r.ok async for r in client.describe_stream([image])] == [True]
            assert counted.new({("bulk", STREAM): 1})

    asyncio.run(calls())


def test_describe_concurrently_is_bulk_for_many_requests_and_interactive_for_one(server):
    counted = Counted(server)
    images = [random_image(10 + i) for i in range(6)]
    with NetVLADClient(server.target, timeout=TIMEOUT) as client:
        chunks = [images[:2], images[2:4], images[4:]]
        rows = dict(describe_concurrently(client, chunks, 2))
        np.testing.assert_allclose(rows[1], np.stack([reference(p) for p in images[2:4]]),
                                   atol=1e-6)
        assert counted.new({("bulk", DESCRIBE): 3})
        dict(describe_concurrently(client, [images[:3]], 2))
        assert counted.new({("interactive", DESCRIBE): 1})
        dict(describe_concurrently(client, chunks, 2, priority="interactive"))
        assert counted.new({("interactive", DESCRIBE): 3})
    with NetVLADClient(server.target, timeout=TIMEOUT, priority="interactive") as client:
        dict(describe_concurrently(client, chunks, 2))  # the client's own class wins
        assert counted.new({("interactive", DESCRIBE): 3})


def test_bulk_callers_size_their_load_by_the_bulk_budget(server):
    with NetVLADClient(server.target, timeout=TIMEOUT) as client:
        info = client.info()
        assert (info.batching.max_queue_size, info.batching.max_bulk_queue_size) == (64, 16)
        heard = []
        chunks = [[random_image(20 + i)] * 4 for i in range(5)]
        done = dict(describe_concurrently(client, chunks, 8,
                                          on_lowered=lambda *note: heard.append(note)))
        assert sorted(done) == [0, 1, 2, 3, 4]
        assert heard == [(4, 4, 16, "bulk")]  # 16 bulk places hold 4 requests of 4 images
        heard.clear()
        dict(describe_concurrently(client, chunks, 8, priority="interactive",
                                   on_lowered=lambda *note: heard.append(note)))
        assert heard == []  # 8 requests of 4 fit in the 64 interactive places


def test_queue_budget_and_safe_concurrency_per_class():
    def info(queue: int, bulk: int, default: int = pb.PRIORITY_UNSPECIFIED) -> pb.ModelInfo:
        return pb.ModelInfo(default_priority=default, batching=pb.BatchingLimits(
            max_queue_size=queue, max_bulk_queue_size=bulk))

    assert queue_budget(info(64, 16), "bulk") == (16, "bulk")
    assert queue_budget(info(64, 16), "interactive") == (64, "interactive")
    assert queue_budget(info(64, 16)) == (64, "interactive")  # an older server: interactive
    assert queue_budget(info(64, 16, pb.PRIORITY_BULK)) == (16, "bulk")  # its default class
    assert queue_budget(info(64, 0), "bulk") == (64, "bulk")  # no bulk budget: the shared one
    assert queue_safe_concurrency(info(64, 16), 8, 4, "bulk") == 4
    assert queue_safe_concurrency(info(64, 16), 8, 4, pb.PRIORITY_INTERACTIVE) == 8
    assert queue_safe_concurrency(info(64, 0), 8, 16, "bulk") == 4
    assert queue_safe_concurrency(info(64, 16), 8, 32, "bulk") == 1  # at least one request


def test_the_priority_rule_of_bulk_jobs():
    plain = ClientConfig("127.0.0.1")
    assert bulk_priority(plain, 3) == pb.PRIORITY_BULK
    assert bulk_priority(plain, 1) == pb.PRIORITY_INTERACTIVE
    assert bulk_priority(plain, 3, "interactive") == pb.PRIORITY_INTERACTIVE
    chosen = dataclasses.replace(plain, priority="interactive")
    assert bulk_priority(chosen, 3) == pb.PRIORITY_INTERACTIVE


@pytest.mark.parametrize("given, wire", [
    (None, pb.PRIORITY_UNSPECIFIED), ("interactive", pb.PRIORITY_INTERACTIVE),
    (" BULK ", pb.PRIORITY_BULK), ("PRIORITY_BULK", pb.PRIORITY_BULK),
    ("default", pb.PRIORITY_UNSPECIFIED), (pb.PRIORITY_BULK, pb.PRIORITY_BULK), (0, 0),
])
def test_priority_values_a_client_accepts(given, wire):
    assert ClientConfig("127.0.0.1", priority=given).priority == wire


@pytest.mark.parametrize("bad", ["urgent", "", 3, -1, True, 1.0])
def test_an_unknown_priority_is_refused_before_any_call(bad):
    with pytest.raises(NetVLADInputError, match=r"priority must be 'interactive', 'bulk', None"):
        NetVLADClient("127.0.0.1:1", priority=bad)
    with NetVLADClient("127.0.0.1:1", retries=0) as client, \
            pytest.raises(NetVLADInputError, match=repr(bad).replace("(", r"\(")):
        client.describe(random_image(1), priority=bad)


# --------------------------------------------------------------------------- command line


def cli(running: ServerThread, *args: str) -> int:
    return cli_main(["--target", running.target, *args])


@pytest.fixture
def pictures(tmp_path):
    folder = tmp_path / "pictures"
    folder.mkdir()
    return [write_png(folder / f"{i}.png", random_image(30 + i, 32, 32)) for i in range(6)]


def test_describe_defaults_by_size_and_the_flag_and_variable_override(server, pictures,
                                                                      tmp_path, monkeypatch,
                                                                      capsys):
    counted = Counted(server)
    folder, out = str(pictures[0].parent), str(tmp_path / "d.npy")
    monkeypatch.delenv("NETVLAD_CLIENT_PRIORITY", raising=False)
    # Six images in requests of 2: more than one request's worth, so bulk.
    assert cli(server, "describe", folder, "--batch-size", "2", "--out", out) == 0
    assert counted.new({("bulk", DESCRIBE): 3})
    expected = np.stack([reference(random_image(30 + i, 32, 32)) for i in range(6)])
    np.testing.assert_allclose(np.load(out), expected, atol=1e-6)
    # The default request size is 4 on this server: six images make two requests, so bulk.
    assert cli(server, "describe", folder, "--out", out) == 0
    assert counted.new({("bulk", DESCRIBE): 2})
    # One request's worth (three images, or one): interactive.
    assert cli(server, "describe", *map(str, pictures[:3]), "--out", out) == 0
    assert counted.new({("interactive", DESCRIBE): 1})
    assert cli(server, "describe", str(pictures[0]), "--out", out) == 0
    assert counted.new({("interactive", DESCRIBE): 1})
    assert cli(server, "--priority", "interactive", "describe", folder, "--batch-size", "2",
               "--out", out) == 0
    assert counted.new({("interactive", DESCRIBE): 3})
    monkeypatch.setenv("NETVLAD_CLIENT_PRIORITY", "bulk")
    assert cli(server, "describe", str(pictures[0]), "--out", out) == 0
    assert counted.new({("bulk", DESCRIBE): 1})
    assert cli(server, "--priority", "interactive", "describe", str(pictures[0]), "--out",
               out) == 0  # the flag wins over the variable
    assert counted.new({("interactive", DESCRIBE): 1})
    monkeypatch.setenv("NETVLAD_CLIENT_PRIORITY", "urgent")
    with pytest.raises(SystemExit) as caught:
        cli(server, "describe", str(pictures[0]), "--out", out)
    assert caught.value.code == 2
    assert ("environment variable NETVLAD_CLIENT_PRIORITY='urgent': expected one of "
            "interactive, bulk" in capsys.readouterr().err)


def test_describe_sizes_its_requests_in_flight_by_the_bulk_budget(server, pictures, tmp_path,
                                                                  capsys):
    out = str(tmp_path / "d.npy")
    assert cli(server, "describe", str(pictures[0].parent), "--out", out, "--batch-size", "2",
               "--concurrency", "40") == 0
    assert ("40 requests of 2 images would overfill the server's bulk queue of 16; sending 8 "
            "at a time" in capsys.readouterr().err)
    assert cli(server, "--priority", "interactive", "describe", str(pictures[0].parent),
               "--out", out, "--batch-size", "2", "--concurrency", "40") == 0
    assert ("the server's interactive queue of 64; sending 32 at a time"
            in capsys.readouterr().err)


def test_evaluate_and_evaluate_retrieval_are_bulk(server, pictures, tmp_path):
    counted = Counted(server)
    positions = tmp_path / "positions.txt"
    np.savetxt(positions, [((i % 3) * 10.0, 0.0, i // 3) for i in range(6)])  # a loop, twice
    assert cli(server, "evaluate", "--images", str(pictures[0].parent), "--positions",
               str(positions), "--dims", "all", "--out", str(tmp_path / "eval"),
               "--suppression", "1", "--no-plots") == 0
    assert counted.new({("bulk", DESCRIBE): 2})  # 6 images, 4 a request
    root = pictures[0].parent
    (tmp_path / "db.csv").write_text("".join(f"{p.name},{100 * i},0\n"
                                             for i, p in enumerate(pictures[:4])))
    (tmp_path / "q.csv").write_text(f"{pictures[4].name},0,5\n")
    assert cli(server, "evaluate-retrieval", "--database", str(tmp_path / "db.csv"),
               "--queries", str(tmp_path / "q.csv"), "--db-root", str(root), "--out",
               str(tmp_path / "retrieval"), "--examples", "0") == 0
    assert counted.new({("bulk", DESCRIBE): 2})  # the database and the queries
    assert cli(server, "--priority", "interactive", "evaluate", "--images", str(root),
               "--positions", str(positions), "--dims", "all", "--out",
               str(tmp_path / "eval2"), "--suppression", "1", "--no-plots") == 0
    assert counted.new({("interactive", DESCRIBE): 2})


def test_info_shows_the_bulk_budget_and_the_default_class(server, bulk_default_server, capsys):
    assert cli(server, "info") == 0
    shown = capsys.readouterr().out
    assert "max queue size    64 interactive, 16 bulk images" in shown
    assert "default priority  interactive" in shown
    assert cli(bulk_default_server, "info") == 0
    shown = capsys.readouterr().out
    assert "max queue size    64 interactive, 64 bulk images" in shown  # bulk shares the size
    assert "default priority  bulk" in shown
