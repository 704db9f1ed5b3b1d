"""The wire contract: generated code is current and the names other-language clients rely on exist."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_generated_code_is_current():
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gen_proto.py"), "--check"],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_stale_check_detects_an_edit(tmp_path, monkeypatch):
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import gen_proto
    finally:
        sys.path.pop(0)
    out = tmp_path / "_proto"
    out.mkdir()
    for name, text in gen_proto.generate().items():
        (out / name).write_text(text)
    monkeypatch.setattr(gen_proto, "OUT_DIR", out)
    assert gen_proto.main(["--check"]) == 0
    (out / "netvlad_pb2.py").write_text((out / "netvlad_pb2.py").read_text() + "\n# edited\n")
    assert gen_proto.main(["--check"]) == 1


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
