#!/usr/bin/env bash
# QUIC against gRPC on a lossy link, side by side in one run: a coordinator and a worker per
# branch (`spotlight up --serve`) in the "cloud" namespace, an edge agent in the "edge"
# namespace streaming test images with 64 frames in flight, joined through the impairment
# relay (scripts/impair.sh, docs/impairment.md). The edge alternates gRPC, QUIC, and QUIC
# with COPIES copies of every message (`quic_copies`; skipped when COPIES=1), ROUNDS times,
# and prints each run's summary (p50/p99 latency, frames/s). With PRECOMPUTE=1 (the
# default) the edge runs its backbone over all FRAMES images before sending any and times
# each frame from when it is sent (`precompute`): the transport's latency, without the
# edge's compute queue on these shared cores; PRECOMPUTE=0 times from raw image.
#
#   scripts/quic-vs-grpc.sh   LOSS=1 (% per direction) RTT=40 (ms) FRAMES=2000 ROUNDS=3 COPIES=2
#
# Needs root, /dev/net/tun and network namespaces; otherwise the relay says "skipped".
set -euo pipefail
cd "$(dirname "$0")/.."
LOSS=${LOSS:-1}
RTT=${RTT:-40}
FRAMES=${FRAMES:-2000}
ROUNDS=${ROUNDS:-3}
SEED=${SEED:-1}
COPIES=${COPIES:-2}
PRECOMPUTE=${PRECOMPUTE:-1}
[ "$PRECOMPUTE" = 1 ] && precompute=true || precompute=false
variants="grpc quic"
[ "$COPIES" -gt 1 ] && variants="$variants quic-x$COPIES"
make --quiet onnxruntime dataset
cargo build --release --bin spotlight
bin=$PWD/target/release/spotlight
export ORT_DYLIB_PATH=$PWD/build/onnxruntime/libonnxruntime.so
images=/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz
labels=/usr/share/datasets/fashion-mnist/t10k-labels-idx1-ubyte.gz
cloud="exec $bin --insecure up --serve --switch-to none --grpc-listen \$IMPAIR_CLOUD_IP:7000 --http-listen \$IMPAIR_CLOUD_IP:7080"
edge="for r in \$(seq 1 $ROUNDS); do for v in $variants; do
  echo \"== round \$r transport \$v loss $LOSS% per direction rtt ${RTT} ms\";
  t=\${v%-x*}; copies=1; [ \$v != \$t ] && copies=$COPIES;
  SPOTLIGHT_EDGE__PRECOMPUTE=$precompute SPOTLIGHT_EDGE__QUIC_COPIES=\$copies $bin --insecure edge --coordinator http://\$IMPAIR_CLOUD_IP:7000 --transport \$t \
    --idx-images $images --idx-labels $labels --limit $FRAMES | grep -E '^(frames|throughput)';
done; done"
exec scripts/impair.sh --loss "$LOSS" --rtt "$RTT" --seed "$SEED" --wait-port 7000 -- \
    bash -c "$cloud" -- bash -c "$edge"
