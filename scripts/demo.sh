#!/usr/bin/env bash
# The README's main command: start a server (on the real weights when models/ holds them, else on
# demo weights), describe docs/samples through it with the client CLI, print the descriptors'
# shape and pairwise similarities, then stop the server.
set -euo pipefail
cd "$(dirname "$0")/.."

port="${PORT:-50051}"
metrics_port="${METRICS_PORT:-9090}"
official="models/vd16_pitts30k_conv5_3_vlad_preL2_intra_white"
model="${NETVLAD_MODEL:-}"
if [[ -z "$model" ]]; then
    if [[ -d "$official" ]]; then model="$official"; else model="demo"; fi
fi

mkdir -p out
echo "starting netvlad-server --model $model on 127.0.0.1:$port (log: out/demo-server.log)"
netvlad-server --model "$model" --host 127.0.0.1 --port "$port" --metrics-port "$metrics_port" \
    >out/demo-server.log 2>&1 &
server=$!
trap 'kill -TERM "$server" 2>/dev/null; wait "$server" 2>/dev/null || true' EXIT

for _ in $(seq 1 300); do
    if netvlad-client --target "127.0.0.1:$port" health >/dev/null 2>&1; then break; fi
    if ! kill -0 "$server" 2>/dev/null; then
        echo "the server exited while starting; its log:" >&2
        cat out/demo-server.log >&2
        exit 1
    fi
    sleep 1
done
netvlad-client --target "127.0.0.1:$port" health
netvlad-client --target "127.0.0.1:$port" info
netvlad-client --target "127.0.0.1:$port" describe docs/samples --out out/samples.npz
python scripts/show_similarities.py out/samples.npz
if [[ "$model" == demo* ]]; then
    echo "NOTE: these are DEMO weights (random values): the similarities mean nothing."
    echo "      Put the real weights in models/ (see models/README.md) and run 'make demo' again."
fi
