"""Generated from proto/netvlad/v1/netvlad.proto by scripts/gen_proto.py; do not edit."""
