#!/usr/bin/env bash
# Overload soak: 64 concurrent edge streams (64 frames in flight each) for 5 minutes against a
# coordinator and a worker per top-level branch, as separate processes on loopback. Prints
# frames, errors by gRPC code, p50/p99 latency and each process's resident memory (peak,
# and the peaks of the middle and last thirds: flat means bounded queues held).
#
#   scripts/soak.sh [SECONDS] [STREAMS] [WINDOW]     (defaults: 300 64 64)
#
# Results also go to soak-results/soak.json (memory samples over time included).
set -euo pipefail
cd "$(dirname "$0")/.."
seconds=${1:-300}
streams=${2:-64}
window=${3:-64}
make --quiet onnxruntime dataset
cargo build --release --bin spotlight
exec ./target/release/spotlight bench --soak "$seconds" --streams "$streams" --window "$window" --out soak-results
