"""The wire contract: generated code is current; the names other clients rely on exist."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def gen_proto(*args: str) -> subprocess.CompletedProcess:
    """Run scripts/gen_proto.py in its own interpreter (protoc must not share one with TF)."""
    return subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gen_proto.py"), *args],
        capture_output=True,
        text=True,
    )


def test_generated_code_is_current():
    result = gen_proto("--check")
    assert result.returncode == 0, result.stdout + result.stderr


def test_stale_check_detects_an_edit(tmp_path):
    out = tmp_path / "_proto"
    assert gen_proto("--out-dir", str(out)).returncode == 0
    assert gen_proto("--check", "--out-dir", str(out)).returncode == 0
    generated = out / "netvlad_pb2.py"
    generated.write_text(generated.read_text() + "\n# edited\n")
    result = gen_proto("--check", "--out-dir", str(out))
    assert result.returncode == 1
    assert "netvlad_pb2.py" in result.stdout


def test_contract_names():
    from netvlad_client._proto import netvlad_pb2

    service = netvlad_pb2.DESCRIPTOR.services_by_name["DescriptorService"]
    assert netvlad_pb2.DESCRIPTOR.package == "netvlad.v1"
    methods = {m.name: m for m in service.methods}
    assert methods["DescribeImages"].input_type.name == "DescribeImagesRequest"
    assert methods["DescribeImages"].output_type.name == "DescribeImagesResponse"
    assert methods["StreamDescribeImages"].client_streaming
    assert methods["StreamDescribeImages"].server_streaming
    assert "GetModelInfo" in methods
    image = netvlad_pb2.Image.DESCRIPTOR
    assert {"id", "encoded", "raw"} <= set(image.fields_by_name)
    assert [f.name for f in image.oneofs_by_name["source"].fields] == ["encoded", "raw"]
    values = netvlad_pb2.Descriptor.DESCRIPTOR.fields_by_name["values"]
    assert values.is_packed and values.type == values.TYPE_FLOAT
    request = netvlad_pb2.DescribeImagesRequest.DESCRIPTOR.fields_by_name
    assert {"images", "dims", "resize"} <= set(request)
    assert "descriptors" in netvlad_pb2.DescribeImagesResponse.DESCRIPTOR.fields_by_name
