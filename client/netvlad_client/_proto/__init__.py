"""Generated from proto/netvlad/v1/*.proto by scripts/gen_proto.py; do not edit."""
