"""Precision choice and TensorFlow runtime settings: `auto` per hardware, plumbing to the server."""

from __future__ import annotations

import os
import re
from pathlib import Path

import grpc
import numpy as np
import pytest
from client_support import ServerProcess, random_image
from netvlad_client._proto import netvlad_pb2 as pb
from netvlad_client._proto import netvlad_pb2_grpc as pb_grpc
from netvlad_client.bench.harness import free_port
from netvlad_server.config import parse_config
from netvlad_server.main import load_model
from netvlad_server.network import NetVLADNetwork
from netvlad_server.runtime import (
    Hardware,
    agreement_with_float32,
    build_network,
    detect_hardware,
    onednn_enabled,
    read_cpu_flags,
    resolve_precision,
)
from prometheus_client.parser import text_string_to_metric_families
from server_thread import ServerThread, tiny_config

ZEN4_FLAGS = frozenset({"avx2", "avx512f", "avx512_bf16", "avx512_vnni"})
SKYLAKE_FLAGS = frozenset({"avx2", "avx512f", "avx512bw", "avx512_vnni"})
SAPPHIRE_RAPIDS_FLAGS = frozenset({"avx512f", "amx_tile", "amx_bf16", "amx_int8"})


@pytest.mark.parametrize(("hardware", "expected"), [
    (Hardware(ZEN4_FLAGS), "bfloat16"),
    (Hardware(SAPPHIRE_RAPIDS_FLAGS), "bfloat16"),
    (Hardware(SKYLAKE_FLAGS), "float32"),  # bf16 would be emulated: slower than float32
    (Hardware(frozenset()), "float32"),
    (Hardware(ZEN4_FLAGS, onednn=False), "float32"),  # Eigen kernels have no fast bf16
    (Hardware(SKYLAKE_FLAGS, gpu_capability=(8, 0)), "bfloat16"),  # A100
    (Hardware(frozenset(), gpu_capability=(9, 0)), "bfloat16"),  # H100
    (Hardware(ZEN4_FLAGS, gpu_capability=(7, 5)), "float16"),  # T4: the GPU decides, not the CPU
    (Hardware(ZEN4_FLAGS, gpu_capability=(7, 0)), "float16"),  # V100
    (Hardware(ZEN4_FLAGS, gpu_capability=(6, 1)), "float32"),  # no tensor cores
])
def test_auto_resolves_from_the_hardware(hardware, expected):
    assert resolve_precision("auto", hardware) == expected


@pytest.mark.parametrize("precision", ["float32", "bfloat16", "float16"])
def test_explicit_precision_is_kept_whatever_the_hardware(precision):
    for hardware in (Hardware(ZEN4_FLAGS), Hardware(frozenset(), gpu_capability=(6, 1))):
        assert resolve_precision(precision, hardware) == precision


def test_cpu_flags_are_read_from_a_cpuinfo_file(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nmodel name\t: Test CPU\nflags\t\t: fpu sse2 avx512f "
                       "avx512_bf16\n\nprocessor\t: 1\nflags\t\t: fpu\n")
    assert read_cpu_flags(cpuinfo) == {"fpu", "sse2", "avx512f", "avx512_bf16"}
    assert read_cpu_flags(tmp_path / "missing") == frozenset()
    assert resolve_precision("auto", Hardware(read_cpu_flags(cpuinfo))) == "bfloat16"


def test_onednn_switch_follows_the_tensorflow_variable():
    assert onednn_enabled({}) and onednn_enabled({"TF_ENABLE_ONEDNN_OPTS": "1"})
    assert not onednn_enabled({"TF_ENABLE_ONEDNN_OPTS": "0"})
    assert not onednn_enabled({"TF_ENABLE_ONEDNN_OPTS": "false"})


def test_this_machine_is_detected_from_proc_cpuinfo():
    hardware = detect_hardware()
    assert hardware.cpu_flags == read_cpu_flags()
    assert hardware.onednn == onednn_enabled()


def test_thread_and_gpu_flags_parse_with_environment_fallbacks():
    config = parse_config(["--intra-op-threads", "3"], {"NETVLAD_INTER_OP_THREADS": "2",
                                                         "NETVLAD_GPU_MEMORY_GROWTH": "off"})
    assert (config.intra_op_threads, config.inter_op_threads) == (3, 2)
    assert not config.gpu_memory_growth
    with pytest.raises(SystemExit):
        parse_config(["--inter-op-threads", "-1"], {})


def model_info_and_metric(config, loader):
    """GetModelInfo's precision, the netvlad_model_info precision label, and one descriptor."""
    image = random_image(5, 40, 56)
    with ServerThread(config, loader) as running, grpc.insecure_channel(running.target) as channel:
        stub = pb_grpc.DescriptorServiceStub(channel)
        info = stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=60)
        answer = stub.DescribeImages(pb.DescribeImagesRequest(images=[pb.Image(raw=pb.RawImage(
            data=image.tobytes(), height=40, width=56, channels=3))]), timeout=60)
        families = text_string_to_metric_families(running.metrics_text())
        label = next(sample.labels["precision"] for family in families
                     for sample in family.samples if sample.name == "netvlad_model_info")
    return info.precision, label, np.array(answer.descriptors[0].values), image


def test_auto_keeps_a_lower_precision_only_when_it_agrees_with_float32(tiny_weights, caplog):
    cosine = agreement_with_float32(NetVLADNetwork(tiny_weights, "bfloat16"), (32, 48))
    assert 0.99 < cosine < 1.0  # close, yet really computed in bfloat16
    assert agreement_with_float32(NetVLADNetwork(tiny_weights), (32, 48)) == pytest.approx(1.0)
    zen4 = Hardware(ZEN4_FLAGS)

    def built(requested: str, hardware: Hardware, min_cosine: float) -> str:
        network = build_network(tiny_weights, requested, False, (32, 48), hardware, min_cosine)
        return network.precision

    assert built("auto", zen4, 0.99) == "bfloat16"
    assert built("auto", zen4, 1.0) == "float32"
    assert "precision auto -> float32: bfloat16 descriptors" in caplog.text
    assert built("auto", Hardware(SKYLAKE_FLAGS), 0.0) == "float32"  # no bf16 instructions
    assert built("bfloat16", zen4, 1.0) == "bfloat16"  # an explicit choice is not second-guessed


def test_float32_reference_is_the_float32_network(tiny_weights):
    images = np.stack([random_image(seed, 40, 56) for seed in (1, 2)])
    reference = NetVLADNetwork(tiny_weights, "bfloat16").float32_reference(images)
    np.testing.assert_allclose(reference, NetVLADNetwork(tiny_weights)(images), atol=1e-6)


def test_auto_precision_is_resolved_and_reported(tiny_weights):
    config = tiny_config(free_port(), precision="auto")
    reported, label, _, _ = model_info_and_metric(config, load_model)
    expected = build_network(tiny_weights, "auto", False, config.warmup_sizes[0]).precision
    assert reported == label == expected != "auto"


def test_bfloat16_server_reports_it_and_stays_close_to_float32(tiny_weights):
    config = tiny_config(free_port(), precision="bfloat16")
    reported, label, row, image = model_info_and_metric(config, load_model)
    assert reported == label == "bfloat16"
    float32_row = NetVLADNetwork(tiny_weights)(image)[0]
    assert not np.array_equal(row, float32_row)  # really computed in another precision
    assert float(np.dot(row, float32_row)) > 0.999


def test_thread_settings_reach_tensorflow(tmp_path):
    # Inter-op threads show up as threads named tf_Compute; pick a count no default would give.
    inter = 5 if (os.cpu_count() or 1) != 5 else 6
    server = ServerProcess(free_port(), free_port(), tmp_path / "server.log",
                           "--intra-op-threads", "1", "--inter-op-threads", str(inter))
    try:
        server.wait_serving()
        log = server.log.read_text()
        assert re.search(rf"TensorFlow threads: intra-op 1, inter-op {inter}\b", log), log
        task = Path(f"/proc/{server.process.pid}/task")
        names = [(thread / "comm").read_text().strip() for thread in task.iterdir()]
        assert names.count("tf_Compute") == inter, names
    finally:
        server.stop()
