"""Priority classes on a real server: interactive work ahead of bulk work, each its own budget.

The tiny model runs behind InstrumentedModel, whose gate holds the model thread so that the
queue fills deterministically; the order in which image shapes reach the network shows the
order the scheduler chose.
"""

from __future__ import annotations

import dataclasses

import grpc
import numpy as np
import pytest
from netvlad_client._proto import netvlad_pb2 as pb
from netvlad_server.config import ConfigError, config_from_values
from netvlad_server.service import batching_policy
from prometheus_client.parser import text_string_to_metric_families
from server_thread import HeldServer, wait_for

TIMEOUT = 60.0
RNG = np.random.default_rng(13)
BULK, INTERACTIVE, UNSPECIFIED = pb.PRIORITY_BULK, pb.PRIORITY_INTERACTIVE, pb.PRIORITY_UNSPECIFIED


def pictures(count: int, height: int, width: int = 20) -> list[np.ndarray]:
    return [RNG.integers(0, 256, (height, width, 3), dtype=np.uint8) for _ in range(count)]


def request(images: list[np.ndarray], priority: int = UNSPECIFIED) -> pb.DescribeImagesRequest:
    return pb.DescribeImagesRequest(priority=priority, images=[
        pb.Image(raw=pb.RawImage(data=image.tobytes(), height=image.shape[0],
                                 width=image.shape[1], channels=3)) for image in images])


def rows(response: pb.DescribeImagesResponse) -> np.ndarray:
    return np.array([d.values for d in response.descriptors], dtype=np.float32)


class Held(HeldServer):
    """The held server, sending raw requests of a chosen class."""

    def send(self, images: list[np.ndarray], priority: int = UNSPECIFIED,
             timeout: float = TIMEOUT) -> grpc.Future:
        return self.stub.DescribeImages.future(request(images, priority), timeout=timeout)

    def occupy(self, priority: int = BULK) -> grpc.Future:
        """Close the gate and park one 16x17 image inside the model."""
        return self.park(request(pictures(1, 16, 17), priority), TIMEOUT)

    def wait_depth(self, depth: int) -> None:
        wait_for(lambda: self.running.server.queue_depth == depth, what=f"{depth} queued images")

    def heights_run(self) -> list[int]:
        """Heights of the images that reached the network, in order, the parked one first."""
        return [shape[0] for shape in self.model.shapes_run()]

    def samples(self, name: str) -> dict[tuple[str, ...], float]:
        """One metric's samples from /metrics, keyed by their label values (sorted by name)."""
        return {tuple(value for _, value in sorted(sample.labels.items())): sample.value
                for family in text_string_to_metric_families(self.running.metrics_text())
                for sample in family.samples if sample.name == name}


def refusal(future: grpc.Future) -> grpc.RpcError:
    """The error of a call that must have been refused."""
    error = future.exception(TIMEOUT)
    assert isinstance(error, grpc.RpcError), "the call was not refused"
    return error


def test_interactive_work_runs_ahead_of_queued_bulk_work(tiny_model, network):
    with Held(tiny_model, max_batch_size=2, max_queue_delay_ms=0.0, max_queue_size=8,
              max_bulk_queue_size=16, max_images_per_request=4) as held:
        busy = held.occupy(BULK)
        bulk = [pictures(4, 20) for _ in range(3)]
        bulk_calls = [held.send(four, BULK) for four in bulk]
        held.wait_depth(12)
        interactive = [pictures(1, 24), pictures(2, 28)]
        interactive_calls = [held.send(interactive[0]), held.send(interactive[1], INTERACTIVE)]
        held.wait_depth(15)
        assert held.samples("netvlad_class_queue_depth") == {("bulk",): 12, ("interactive",): 3}
        held.model.gate.set()
        for images, call in zip(bulk + interactive, bulk_calls + interactive_calls, strict=True):
            np.testing.assert_allclose(rows(call.result()), network(np.stack(images)), atol=1e-5)
        busy.result()
        # The queued interactive images overtook all twelve bulk images queued before them.
        assert held.heights_run() == [16, 24, 28, 28] + [20] * 12
        wait_for(lambda: held.samples("netvlad_class_requests_total").get(
            ("bulk", "OK", "DescribeImages")) == 4, what="the bulk calls to be counted")
        assert held.samples("netvlad_class_requests_total") == {
            ("bulk", "OK", "DescribeImages"): 4, ("interactive", "OK", "DescribeImages"): 2}
        waits = held.samples("netvlad_class_queue_wait_seconds_count")
        assert waits == {("bulk",): 13, ("interactive",): 3}
        durations = held.samples("netvlad_class_request_duration_seconds_count")
        assert durations == {("bulk", "DescribeImages"): 4, ("interactive", "DescribeImages"): 2}


def test_interactive_work_runs_between_the_steps_of_a_running_bulk_batch(tiny_model, network):
    with Held(tiny_model, max_batch_size=4, mixed_bulk_batch_size=1, max_queue_delay_ms=0.0,
              max_images_per_request=4) as held:
        bulk = pictures(4, 20)
        bulk_call = held.park(request(bulk, BULK), TIMEOUT)  # its first step holds the model
        urgent = pictures(1, 24)
        urgent_call = held.send(urgent, INTERACTIVE)
        held.wait_depth(1)
        held.model.gate.set()
        np.testing.assert_allclose(rows(urgent_call.result()), network(np.stack(urgent)),
                                   atol=1e-5)
        # The bulk batch of four, computed in steps of one with a whitening for all four at the
        # end, gives the network's descriptors.
        np.testing.assert_allclose(rows(bulk_call.result()), network(np.stack(bulk)), atol=1e-5)
        assert held.heights_run() == [20, 24, 20, 20, 20]
        wait_for(lambda: held.samples("netvlad_class_queue_wait_seconds_count") == {
            ("bulk",): 4, ("interactive",): 1}, what="both batches to be counted")


def test_a_full_bulk_queue_refuses_bulk_work_but_admits_interactive_work(tiny_model, network):
    with Held(tiny_model, max_batch_size=4, max_queue_delay_ms=0.0, max_queue_size=4,
              max_bulk_queue_size=8, max_images_per_request=4) as held:
        busy = held.occupy(INTERACTIVE)
        bulk = [pictures(4, 20) for _ in range(2)]
        bulk_calls = [held.send(four, BULK) for four in bulk]
        held.wait_depth(8)
        error = refusal(held.send(pictures(1, 20), BULK))
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "the bulk queue holds 8 of 8 items" in error.details()
        assert "--max-bulk-queue-size" in error.details()
        assert ("netvlad-busy", "queue-full") in tuple(error.trailing_metadata())
        urgent = pictures(4, 24)
        urgent_call = held.send(urgent, INTERACTIVE)  # the full bulk queue does not stop it
        held.wait_depth(12)
        error = refusal(held.send(pictures(1, 24)))
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "the interactive queue holds 4 of 4 items" in error.details()
        assert "--max-queue-size" in error.details()
        assert ("netvlad-busy", "queue-full") in tuple(error.trailing_metadata())
        assert not held.model.gate.is_set()  # all of this while the model was still busy
        assert held.samples("netvlad_class_queue_limit") == {("bulk",): 8, ("interactive",): 4}
        assert held.samples("netvlad_class_queue_depth") == {("bulk",): 8, ("interactive",): 4}
        assert held.samples("netvlad_queue_depth") == {(): 12}
        held.model.gate.set()
        busy.result()
        np.testing.assert_allclose(rows(urgent_call.result()), network(np.stack(urgent)),
                                   atol=1e-5)
        for four, call in zip(bulk, bulk_calls, strict=True):
            np.testing.assert_allclose(rows(call.result()), network(np.stack(four)), atol=1e-5)
        assert held.heights_run() == [16] + [24] * 4 + [20] * 8
        wait_for(lambda: ("bulk", "OK", "DescribeImages") in
                 held.samples("netvlad_class_requests_total"), what="bulk calls to be counted")
        counts = held.samples("netvlad_class_requests_total")
        assert counts[("bulk", "RESOURCE_EXHAUSTED", "DescribeImages")] == 1
        assert counts[("interactive", "RESOURCE_EXHAUSTED", "DescribeImages")] == 1


def test_queued_bulk_work_runs_after_at_most_four_interactive_batches(tiny_model, network):
    with Held(tiny_model, max_batch_size=1, max_queue_delay_ms=0.0, max_queue_size=16,
              max_images_per_request=16) as held:
        busy = held.occupy(INTERACTIVE)
        bulk = pictures(2, 20)
        bulk_call = held.send(bulk, BULK)
        held.wait_depth(2)
        interactive_calls = [held.send(pictures(1, 24), INTERACTIVE) for _ in range(10)]
        held.wait_depth(12)
        held.model.gate.set()
        busy.result()
        np.testing.assert_allclose(rows(bulk_call.result()), network(np.stack(bulk)), atol=1e-5)
        for call in interactive_calls:
            call.result()
        assert held.heights_run() == [16] + [24] * 4 + [20] + [24] * 4 + [20] + [24] * 2


def test_an_unspecified_priority_takes_the_configured_default(tiny_model, network):
    with Held(tiny_model, default_priority="bulk", max_batch_size=2, max_queue_delay_ms=0.0,
              max_queue_size=4, max_images_per_request=4) as held:
        info = held.stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=TIMEOUT)
        assert info.default_priority == BULK
        assert info.batching.max_queue_size == 4 and info.batching.max_bulk_queue_size == 4
        busy = held.occupy(INTERACTIVE)
        plain = pictures(2, 20)
        plain_call = held.send(plain)  # unspecified: bulk on this server
        held.wait_depth(2)
        urgent = pictures(1, 24)
        urgent_call = held.send(urgent, INTERACTIVE)
        held.wait_depth(3)
        assert held.samples("netvlad_class_queue_depth") == {("bulk",): 2, ("interactive",): 1}
        held.model.gate.set()
        busy.result()
        np.testing.assert_allclose(rows(plain_call.result()), network(np.stack(plain)),
                                   atol=1e-5)
        np.testing.assert_allclose(rows(urgent_call.result()), network(np.stack(urgent)),
                                   atol=1e-5)
        assert held.heights_run() == [16, 24, 20, 20]
    with Held(tiny_model, max_bulk_queue_size=100, max_queue_size=10,
              max_images_per_request=10) as held:
        info = held.stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=TIMEOUT)
        assert info.default_priority == INTERACTIVE
        assert info.batching.max_queue_size == 10 and info.batching.max_bulk_queue_size == 100
        held.stub.DescribeImages(request(pictures(1, 20)), timeout=TIMEOUT)
        wait_for(lambda: held.samples("netvlad_class_requests_total") ==
                 {("interactive", "OK", "DescribeImages"): 1}, what="the call to count")


def test_an_unknown_priority_is_refused_naming_the_known_ones(tiny_model):
    with Held(tiny_model) as held:
        with pytest.raises(grpc.RpcError) as caught:
            held.stub.DescribeImages(request(pictures(1, 20), 7), timeout=TIMEOUT)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        details = caught.value.details()
        assert "unknown priority 7" in details and "PRIORITY_INTERACTIVE (1)" in details
        assert "PRIORITY_BULK (2)" in details and "default (interactive)" in details


def test_stream_frames_queue_in_the_class_their_request_names(tiny_model, network):
    with Held(tiny_model, max_batch_size=1, max_queue_delay_ms=0.0, max_stream_inflight=4) as held:
        busy = held.occupy(INTERACTIVE)
        frames = [pictures(1, 20), pictures(1, 20), pictures(1, 24)]
        priorities = [BULK, BULK, UNSPECIFIED]
        messages = [pb.StreamDescribeImagesRequest(sequence=i + 1, request=request(frame, level))
                    for i, (frame, level) in enumerate(zip(frames, priorities, strict=True))]
        stream = held.stub.StreamDescribeImages(iter(messages), timeout=TIMEOUT)
        held.wait_depth(3)
        held.model.gate.set()
        received = list(stream)
        busy.result()
        assert [answer.sequence for answer in received] == [1, 2, 3]  # answers stay in order
        for frame, answer in zip(frames, received, strict=True):
            np.testing.assert_allclose(rows(answer.response), network(np.stack(frame)), atol=1e-5)
        assert held.heights_run() == [16, 24, 20, 20]  # the interactive frame went first
        wait_for(lambda: held.samples("netvlad_class_requests_total").get(
            ("bulk", "OK", "StreamDescribeImages")) == 2, what="the bulk frames to count")
        assert held.samples("netvlad_class_requests_total")[
            ("interactive", "OK", "StreamDescribeImages")] == 1


@pytest.mark.parametrize("priority", [INTERACTIVE, BULK])
def test_deadlines_and_cancellation_work_in_both_classes(tiny_model, priority):
    name = pb.Priority.Name(priority).removeprefix("PRIORITY_").lower()
    with Held(tiny_model, max_batch_size=4, max_queue_delay_ms=0.0) as held:
        busy = held.occupy(INTERACTIVE if priority == BULK else BULK)
        expiring = held.send(pictures(1, 24), priority, timeout=0.3)
        assert refusal(expiring).code() == grpc.StatusCode.DEADLINE_EXCEEDED
        doomed = held.send(pictures(2, 28), priority)
        wait_for(lambda: held.samples("netvlad_class_queue_depth")[(name,)] == 2,
                 what="the doomed images to queue")
        doomed.cancel()
        held.wait_depth(0)
        held.model.gate.set()
        busy.result()
        assert held.heights_run() == [16]  # neither the expired nor the cancelled images ran
        wait_for(lambda: (name, "CANCELLED", "DescribeImages") in
                 held.samples("netvlad_class_requests_total"), what="the cancellation to count")
        codes = held.samples("netvlad_class_requests_total")
        assert codes[(name, "DEADLINE_EXCEEDED", "DescribeImages")] == 1
        after = pictures(1, 20)
        answer = held.stub.DescribeImages(request(after, priority), timeout=TIMEOUT)
        assert rows(answer).shape == (1, 32)


def test_priority_flags_and_variables():
    config = config_from_values({"default_priority": "BULK", "max_bulk_queue_size": "256"}, {})
    assert config.default_priority == "bulk" and config.bulk_queue_size == 256
    config = config_from_values({}, {"NETVLAD_DEFAULT_PRIORITY": "bulk",
                                     "NETVLAD_MAX_BULK_QUEUE_SIZE": "0"})
    assert config.default_priority == "bulk" and config.bulk_queue_size == config.max_queue_size
    with pytest.raises(ConfigError, match="--default-priority: expected one of interactive, bulk"):
        config_from_values({"default_priority": "urgent"}, {})
    with pytest.raises(ConfigError, match="exceeds --max-bulk-queue-size"):
        config_from_values({"max_bulk_queue_size": "8", "max_images_per_request": "16"}, {})


def test_mixed_bulk_batch_size_defaults_to_a_quarter_of_the_batch_and_is_checked():
    assert config_from_values({}, {}).bulk_batch_size_mixed == 2  # a quarter of the default 8
    assert config_from_values({"max_batch_size": "5"}, {}).bulk_batch_size_mixed == 2
    assert config_from_values({"max_batch_size": "1"}, {}).bulk_batch_size_mixed == 1
    config = config_from_values({}, {"NETVLAD_MIXED_BULK_BATCH_SIZE": "8"})
    assert config.bulk_batch_size_mixed == 8  # bulk batches never shrink
    assert batching_policy(config).mixed_batch_size == 8
    with pytest.raises(ConfigError, match=r"--mixed-bulk-batch-size \(9\) exceeds "
                                          r"--max-batch-size \(8\)"):
        config_from_values({"mixed_bulk_batch_size": "9"}, {})


def test_warm_up_runs_the_stages_of_stepped_batches_for_every_size(tiny_model):
    from netvlad_server.main import warm_up
    from server_thread import tiny_config

    first, second = tiny_model.stages
    seen: list[tuple[str, tuple[int, ...]]] = []

    def recorded(name, stage):
        return lambda array: seen.append((name, array.shape)) or stage(array)

    model = dataclasses.replace(tiny_model, stages=(recorded("pool", first),
                                                    recorded("whiten", second)))
    warm_up(model, tiny_config(0, warmup_sizes=((32, 32), (40, 56))))
    pooled = tiny_model.description.num_clusters * tiny_model.description.cluster_dim
    # The first real bulk batch then traces nothing: both stages ran at each warm-up size.
    assert seen == [("pool", (1, 32, 32, 3)), ("whiten", (1, pooled)),
                    ("pool", (1, 40, 56, 3)), ("whiten", (1, pooled))]
