#!/usr/bin/env bash
# QUIC against gRPC on a lossy link, side by side in one run: a coordinator and a worker per
# branch (`spotlight up --serve`) in the "cloud" namespace, an edge agent in the "edge"
# namespace streaming test images with 64 frames in flight, joined through the impairment
# relay (scripts/impair.sh, docs/impairment.md). The edge alternates gRPC and QUIC runs,
# ROUNDS times, and prints each run's summary (p50/p99 latency, frames/s).
#
#   scripts/quic-vs-grpc.sh            LOSS=1 (% per direction) RTT=40 (ms) FRAMES=2000 ROUNDS=3
#
# Needs root, /dev/net/tun and network namespaces; otherwise the relay says "skipped".
set -euo pipefail
cd "$(dirname "$0")/.."
LOSS=${LOSS:-1}
RTT=${RTT:-40}
FRAMES=${FRAMES:-2000}
ROUNDS=${ROUNDS:-3}
SEED=${SEED:-1}
make --quiet onnxruntime dataset
cargo build --release --bin spotlight
bin=$PWD/target/release/spotlight
export ORT_DYLIB_PATH=$PWD/build/onnxruntime/libonnxruntime.so
images=/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz
labels=/usr/share/datasets/fashion-mnist/t10k-labels-idx1-ubyte.gz
cloud="exec $bin --insecure up --serve --switch-to none --grpc-listen \$IMPAIR_CLOUD_IP:7000 --http-listen \$IMPAIR_CLOUD_IP:7080"
edge="for r in \$(seq 1 $ROUNDS); do for t in grpc quic; do
  echo \"== round \$r transport \$t loss $LOSS% per direction rtt ${RTT} ms\";
  $bin --insecure edge --coordinator http://\$IMPAIR_CLOUD_IP:7000 --transport \$t \
    --idx-images $images --idx-labels $labels --limit $FRAMES | grep -E '^(frames|throughput)';
done; done"
exec scripts/impair.sh --loss "$LOSS" --rtt "$RTT" --seed "$SEED" --wait-port 7000 -- \
    bash -c "$cloud" -- bash -c "$edge"
