"""Generate the Python protobuf/gRPC modules from proto/ into client/netvlad_client/_proto.

`python scripts/gen_proto.py` rewrites them; `--check` exits 1 when the committed files differ
from what the current proto/ and grpcio-tools would generate.
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "proto"
PROTO_FILES = ["netvlad/v1/netvlad.proto", "netvlad/v1/places.proto"]
OUT_DIR = ROOT / "client" / "netvlad_client" / "_proto"
PACKAGE = "netvlad_client._proto"
INIT_TEXT = (
    '"""Generated from proto/netvlad/v1/*.proto by scripts/gen_proto.py; do not edit."""\n'
)


def generate() -> dict[str, str]:
    """Run protoc and return {file name: text} for the generated modules."""
    from grpc_tools import protoc

    with tempfile.TemporaryDirectory() as tmp:
        args = [
            "protoc",
            f"-I{PROTO_ROOT}",
            f"--python_out={tmp}",
            f"--pyi_out={tmp}",
            f"--grpc_python_out={tmp}",
            *[str(PROTO_ROOT / name) for name in PROTO_FILES],
        ]
        if protoc.main(args) != 0:
            raise SystemExit("protoc failed")
        files = {}
        for path in sorted(Path(tmp, "netvlad", "v1").iterdir()):
            text = path.read_text()
            # protoc writes absolute imports rooted at proto/; make them package-relative.
            text = re.sub(r"^from netvlad\.v1 import", f"from {PACKAGE} import", text, flags=re.M)
            files[path.name] = text
        files["__init__.py"] = INIT_TEXT
        return files


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only report stale files")
    parser.add_argument("--out-dir", type=Path, default=OUT_DIR, help="where the modules go")
    args = parser.parse_args(argv)
    out_dir = args.out_dir
    files = generate()
    if args.check:
        stale = [
            name for name, text in files.items()
            if not (out_dir / name).exists() or (out_dir / name).read_text() != text
        ]
        extra = [p.name for p in out_dir.glob("*.py*") if p.name not in files]
        if stale or extra:
            print(f"stale generated code in {out_dir}: {sorted(stale + extra)}; run `make proto`")
            return 1
        return 0
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (out_dir / name).write_text(text)
    print(f"wrote {len(files)} files to {out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
