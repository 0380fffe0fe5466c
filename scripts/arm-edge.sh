#!/usr/bin/env bash
# ARM edge under emulation against the x86 cloud roles, end to end.
#
#   1. installs what is missing (Debian: gcc-aarch64-linux-gnu, the arm64 C/C++ runtime for
#      the sysroot /usr/aarch64-linux-gnu, qemu-user, file, protobuf-compiler) and the
#      rustup target;
#   2. cross-builds `spotlight` for aarch64-unknown-linux-gnu;
#   3. takes the aarch64 ONNX Runtime library from the PyPI wheel onnxruntime==1.31.1 into
#      build/onnxruntime-aarch64/ and checks that it is an ARM aarch64 object;
#   4. starts the x86 cloud roles as separate processes on 127.0.0.1 (a coordinator, one
#      worker per top-level branch), over TLS with tokens from `spotlight certs`;
#   5. runs the aarch64 `spotlight edge` under qemu-aarch64 (no binfmt needed: the sysroot
#      is passed with -L; the emulated CPU is a Cortex-A72, as in a Raspberry Pi 4),
#      streaming FRAMES Fashion-MNIST test images over gRPC, then over QUIC, and checks
#      every summary (all frames answered, 0 errors, accuracy >= MIN_ACCURACY) and that the
#      x86 edge gives the same classes for the same images.
#
# Idempotent and non-interactive (fine with CI=true). Prints the time of every step.
#
#   scripts/arm-edge.sh
#
# Environment (all optional):
#   FRAMES=200             images per transport (4 to 8 frames/s under emulation here)
#   TRANSPORTS="grpc quic" transports to run, in order
#   MIN_ACCURACY=85        per-run accuracy floor, percent of labelled images
#   EDGE_TIMEOUT=900       seconds one emulated edge run may take
#   ARM_EDGE_REQUIRED=0    1: a SKIP (no apt, no network, qemu cannot run aarch64) fails
#   CLOUD_BIN=…            an existing x86 `spotlight` to use for the cloud roles instead of
#                          `cargo build --release --bin spotlight`
#   ARM_CPU=cortex-a72     CPU model qemu emulates (cortex-a53, -a57, -a72, -a76, neoverse-n1, max)
#   NATIVE_BASELINE=1      also run the x86 edge once (same frames) to show the emulation cost
#   KEEP=1                 keep the temporary directory (certificates, logs, JSON lines)
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

FRAMES=${FRAMES:-200}
TRANSPORTS=${TRANSPORTS:-grpc quic}
MIN_ACCURACY=${MIN_ACCURACY:-85}
EDGE_TIMEOUT=${EDGE_TIMEOUT:-900}
ARM_EDGE_REQUIRED=${ARM_EDGE_REQUIRED:-0}
NATIVE_BASELINE=${NATIVE_BASELINE:-1}
KEEP=${KEEP:-0}

TARGET=aarch64-unknown-linux-gnu
SYSROOT=/usr/aarch64-linux-gnu
ORT_VERSION=1.31.1
ORT_ARM_DIR=build/onnxruntime-aarch64
ORT_ARM_LIB=$ORT_ARM_DIR/libonnxruntime.so
MODEL=$ROOT/models/fashion-mnist-nested-v2
IMAGES=/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz
LABELS=/usr/share/datasets/fashion-mnist/t10k-labels-idx1-ubyte.gz
TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
ARM_BIN=$TARGET_DIR/$TARGET/release/spotlight

export ORT_DISABLE_TELEMETRY=1 CARGO_TERM_COLOR=never PIP_DISABLE_PIP_VERSION_CHECK=1
export DEBIAN_FRONTEND=noninteractive

T0=$(date +%s.%N)
step_start=$T0
log() { printf '%s\n' "$*"; }
step() {
    step_start=$(date +%s.%N)
    log "== $*"
}
# Seconds since the current step (or since $1) began, one decimal.
since() { awk -v a="${1:-$step_start}" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }'; }
done_step() { log "   ($(since) s)"; }

skip() {
    log "SKIP: $*"
    if [ "$ARM_EDGE_REQUIRED" = 1 ]; then
        log "ARM_EDGE_REQUIRED=1: a skip is a failure"
        exit 1
    fi
    exit 0
}
fail() {
    log "FAIL: $*"
    exit 1
}

# --- 1. packages -------------------------------------------------------------------------
step "packages"
[ "$(uname -m)" = x86_64 ] || skip "this runs an aarch64 edge under emulation beside x86-64 cloud roles; host is $(uname -m)"
have_pkg() { [ "$(dpkg-query -W -f='${Status}' "$1" 2>/dev/null)" = "install ok installed" ]; }
qemu_cmd() { command -v qemu-aarch64 || command -v qemu-aarch64-static || true; }
missing=()
for p in gcc-aarch64-linux-gnu libc6-dev-arm64-cross libstdc++6-arm64-cross file; do
    have_pkg "$p" || missing+=("$p")
done
[ -n "$(qemu_cmd)" ] || missing+=(qemu-user)
# protoc for the etcd client's build script (runs on the host, also when cross-building).
command -v protoc >/dev/null || missing+=(protobuf-compiler)
if [ ${#missing[@]} -gt 0 ]; then
    command -v apt-get >/dev/null || skip "missing ${missing[*]} and no apt-get to install them"
    if [ "$(id -u)" = 0 ]; then
        SUDO=()
    elif command -v sudo >/dev/null && sudo -n true 2>/dev/null; then
        SUDO=(sudo -n)
    else
        skip "missing ${missing[*]}; installing needs root or password-less sudo"
    fi
    log "installing: ${missing[*]}"
    "${SUDO[@]}" apt-get update -qq || skip "apt-get update failed (no network?)"
    "${SUDO[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null ||
        skip "apt-get install ${missing[*]} failed"
fi
QEMU=$(qemu_cmd)
[ -n "$QEMU" ] || skip "no qemu-aarch64 after installing qemu-user"
log "   qemu: $QEMU ($("$QEMU" --version | head -n1))"
log "   cross compiler: $(aarch64-linux-gnu-gcc --version | head -n1)"
done_step

# --- 2. cross-build ----------------------------------------------------------------------
step "rustup target $TARGET"
if ! rustup target list --installed 2>/dev/null | grep -qx "$TARGET"; then
    rustup target add "$TARGET" || skip "rustup target add $TARGET failed (no network?)"
fi
done_step

step "cross-build spotlight for $TARGET (release)"
# Linker and C compilers for the crates with C or assembly (ring, zstd-sys, mimalloc);
# set by environment so the repository's cargo configuration stays as it is.
export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER=aarch64-linux-gnu-gcc
export CC_aarch64_unknown_linux_gnu=aarch64-linux-gnu-gcc
export AR_aarch64_unknown_linux_gnu=aarch64-linux-gnu-ar
cargo build --release --locked -p spotlight --bin spotlight --target "$TARGET" ||
    fail "cross-build failed"
file -L "$ARM_BIN" | grep -q 'ARM aarch64' || fail "$ARM_BIN is not an aarch64 executable"
glibc_max=$(aarch64-linux-gnu-objdump -T "$ARM_BIN" | grep -o 'GLIBC_[0-9.]*' | sort -uV | tail -n1)
log "   $ARM_BIN: $(du -h "$ARM_BIN" | cut -f1), needs $glibc_max or newer on the device"
done_step

# --- 3. ONNX Runtime for aarch64 ---------------------------------------------------------
step "ONNX Runtime $ORT_VERSION for aarch64 (PyPI wheel)"
if [ ! -f "$ORT_ARM_LIB" ]; then
    mkdir -p build/wheels-aarch64 "$ORT_ARM_DIR"
    python3 -m pip download --quiet --no-deps --only-binary=:all: --dest build/wheels-aarch64 \
        --python-version 3.11 --platform manylinux_2_27_aarch64 --platform manylinux_2_28_aarch64 \
        "onnxruntime==$ORT_VERSION" || skip "pip download of the aarch64 onnxruntime wheel failed (no network?)"
    python3 - "$ORT_VERSION" "$ORT_ARM_LIB" <<'EOF'
import glob, shutil, sys, zipfile
version, dest = sys.argv[1], sys.argv[2]
wheel = sorted(glob.glob(f"build/wheels-aarch64/onnxruntime-{version}-*aarch64.whl"))[-1]
with zipfile.ZipFile(wheel) as w:
    name = next(n for n in w.namelist() if n.startswith("onnxruntime/capi/libonnxruntime.so"))
    with w.open(name) as src, open(dest + ".part", "wb") as out:
        shutil.copyfileobj(src, out)
shutil.move(dest + ".part", dest)
print(f"   installed {name} from {wheel.split('/')[-1]} -> {dest}")
EOF
fi
ort_file=$(file -L "$ORT_ARM_LIB")
log "   ${ort_file#*: }"
case $ort_file in
*"ARM aarch64"*) ;;
*) fail "$ORT_ARM_LIB is not an ARM aarch64 library" ;;
esac
done_step

TMP=$(mktemp -d "${TMPDIR:-/tmp}/spotlight-arm-edge.XXXXXX")
PIDS=()
EDGE_PID=
cleanup() {
    local rc=$?
    if [ -n "$EDGE_PID" ]; then
        kill -KILL -- "-$EDGE_PID" 2>/dev/null || kill -KILL "$EDGE_PID" 2>/dev/null || true
        wait "$EDGE_PID" 2>/dev/null || true
    fi
    for pid in "${PIDS[@]}"; do
        kill "$pid" 2>/dev/null || true
    done
    for pid in "${PIDS[@]}"; do
        wait "$pid" 2>/dev/null || true
    done
    if [ "$rc" != 0 ] && [ -d "$TMP" ]; then
        for f in "$TMP"/*.log; do
            [ -f "$f" ] || continue
            log "--- last lines of $(basename "$f")"
            tail -n 15 "$f" | sed 's/\x1b\[[0-9;]*m//g'
        done
    fi
    if [ "$KEEP" = 1 ]; then
        log "kept $TMP"
    else
        rm -rf "$TMP"
    fi
    log "total $(since "$T0") s"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# --- 4. can qemu run it? -----------------------------------------------------------------
# qemu-user passes the host's /proc/cpuinfo through to the guest, and on this x86 host it
# describes x86 CPUs. ONNX Runtime's CPU detection (cpuinfo) parses it as an ARM listing,
# finds no ARM core and dereferences NULL: the edge dies with SIGSEGV while loading the
# library (a real device has an ARM /proc/cpuinfo and is not affected). So the guest gets a
# root of its own: the cross sysroot's libraries plus a /proc/cpuinfo listing ARM_CPU cores
# (qemu-user looks every absolute path up under -L first), and the emulated CPU is the same
# model, so the instruction set ONNX Runtime sees (HWCAP) and the listing agree.
step "qemu-aarch64 smoke test"
ARM_CPU=${ARM_CPU:-cortex-a72}
case $ARM_CPU in
cortex-a53) midr="0x41 0x0 0xd03 4" features="fp asimd evtstrm aes pmull sha1 sha2 crc32 cpuid" ;;
cortex-a57) midr="0x41 0x1 0xd07 1" features="fp asimd evtstrm aes pmull sha1 sha2 crc32 cpuid" ;;
cortex-a72) midr="0x41 0x0 0xd08 3" features="fp asimd evtstrm crc32 cpuid" ;;
cortex-a76) midr="0x41 0x4 0xd0b 1" features="fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp" ;;
neoverse-n1 | max) midr="0x41 0x3 0xd0c 1" features="fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp" ;;
*) fail "ARM_CPU=$ARM_CPU: use cortex-a53, cortex-a57, cortex-a72, cortex-a76, neoverse-n1 or max" ;;
esac
GUEST_ROOT=$TMP/guest-root
mkdir -p "$GUEST_ROOT/proc" "$GUEST_ROOT/usr"
ln -s "$SYSROOT/lib" "$GUEST_ROOT/lib"
ln -s "$SYSROOT/lib" "$GUEST_ROOT/usr/lib"
read -r implementer variant part revision <<<"$midr"
for ((cpu = 0; cpu < $(getconf _NPROCESSORS_CONF); cpu++)); do
    printf 'processor\t: %d\nBogoMIPS\t: 108.00\nFeatures\t: %s\nCPU implementer\t: %s\n' \
        "$cpu" "$features" "$implementer"
    printf 'CPU architecture: 8\nCPU variant\t: %s\nCPU part\t: %s\nCPU revision\t: %s\n\n' \
        "$variant" "$part" "$revision"
done >"$GUEST_ROOT/proc/cpuinfo"
QEMU_RUN=("$QEMU" -cpu "$ARM_CPU" -L "$GUEST_ROOT")
if ! version=$("${QEMU_RUN[@]}" "$ARM_BIN" --version 2>&1); then
    skip "qemu-aarch64 cannot run $ARM_BIN: $version"
fi
log "   $version (aarch64, emulated $ARM_CPU)"
done_step

# --- 5. x86 cloud roles ------------------------------------------------------------------
step "x86 cloud: binary, ONNX Runtime, dataset"
make --quiet onnxruntime dataset
if [ -z "${CLOUD_BIN:-}" ]; then
    cargo build --release --locked -p spotlight --bin spotlight
    CLOUD_BIN=$TARGET_DIR/release/spotlight
fi
file -L "$CLOUD_BIN" | grep -q 'x86-64' || fail "$CLOUD_BIN is not an x86-64 executable"
export ORT_DYLIB_PATH=$ROOT/build/onnxruntime/libonnxruntime.so
done_step


# Five free ports; the first is free on both TCP and UDP (the coordinator serves gRPC on TCP
# and QUIC on UDP at the same address).
read -r GRPC_PORT HTTP_PORT W1 W2 W3 < <(python3 - <<'EOF'
import socket
held, ports = [], []
while len(ports) < 5:
    t = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    t.bind(("127.0.0.1", 0))
    port = t.getsockname()[1]
    if not ports:
        u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            u.bind(("127.0.0.1", port))
        except OSError:
            t.close()
            continue
        held.append(u)
    held.append(t)
    ports.append(port)
print(*ports)
EOF
)

step "x86 cloud roles on 127.0.0.1 (TLS + tokens)"
S=$TMP/secrets
"$CLOUD_BIN" certs --out "$S" >/dev/null
# A token of its own for the aarch64 edge, issued as docs/edge-install.md tells operators to:
# a random string in a file for the device, its SHA-256 in the coordinator's tokens file.
printf 'spotlight_edge_%s' "$(head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n')" >"$S/edge-arm.token"
printf '\n[[token]]\nname = "edge-arm-qemu"\nrole = "edge"\nsha256 = "%s"\n' \
    "$(sha256sum <"$S/edge-arm.token" | cut -d' ' -f1)" >>"$S/tokens.toml"
"$CLOUD_BIN" coordinator --model "$MODEL" \
    --grpc-listen "127.0.0.1:$GRPC_PORT" --http-listen "127.0.0.1:$HTTP_PORT" \
    --state-file "$TMP/task.json" \
    --ca "$S/ca.pem" --cert "$S/coordinator.pem" --key "$S/coordinator.key" \
    --tokens "$S/tokens.toml" --token-file "$S/coordinator.token" >"$TMP/coordinator.log" 2>&1 &
PIDS+=($!)
set -- "$W1" "$W2" "$W3"
for branch in tops footwear other; do
    port=$1
    shift
    "$CLOUD_BIN" worker --model "$MODEL" --id "worker-$branch" --branches "$branch" \
        --coordinator "https://127.0.0.1:$GRPC_PORT" \
        --listen "127.0.0.1:$port" --advertise "https://127.0.0.1:$port" \
        --ca "$S/ca.pem" --cert "$S/worker.pem" --key "$S/worker.key" \
        --tokens "$S/tokens.toml" --token-file "$S/worker.token" >"$TMP/worker-$branch.log" 2>&1 &
    PIDS+=($!)
done
ready=0
for _ in $(seq 1 150); do
    if curl -fsS --cacert "$S/ca.pem" "https://127.0.0.1:$HTTP_PORT/readyz" >/dev/null 2>&1; then
        ready=1
        break
    fi
    for pid in "${PIDS[@]}"; do
        kill -0 "$pid" 2>/dev/null || fail "a cloud role exited during start-up"
    done
    sleep 0.2
done
[ "$ready" = 1 ] || fail "the coordinator was not ready (every segment served) within 30 s"
log "   coordinator https://127.0.0.1:$GRPC_PORT (gRPC + QUIC), HTTP :$HTTP_PORT; workers tops :$W1 footwear :$W2 other :$W3"
done_step

# --- 6. edge runs ------------------------------------------------------------------------
# The aarch64 edge reads a config file laid out as on a device (docs/edge-install.md); only
# the image source and the transport come as flags. The x86 baseline passes everything as flags.
cat >"$TMP/edge.toml" <<EOF
model = "$MODEL"
onnxruntime = "$ROOT/$ORT_ARM_LIB"

[security]
ca = "$S/ca.pem"
token = "$S/edge-arm.token"

[edge]
coordinator = "https://127.0.0.1:$GRPC_PORT"
edge_id = "arm-edge-qemu"
EOF
SOURCE_ARGS=(--idx-images "$IMAGES" --idx-labels "$LABELS" --limit "$FRAMES")
ARM_EDGE=(env -u ORT_DYLIB_PATH "${QEMU_RUN[@]}" "$ARM_BIN" edge --config "$TMP/edge.toml")
X86_EDGE=("$CLOUD_BIN" edge --model "$MODEL" --coordinator "https://127.0.0.1:$GRPC_PORT"
    --ca "$S/ca.pem" --token-file "$S/edge.token")

RESULTS=()
# run_edge NAME TRANSPORT COMMAND…: runs one edge, checks its summary, records a line.
run_edge() {
    local name=$1 transport=$2
    shift 2
    local out=$TMP/edge-$name-$transport
    step "edge $name over $transport: $FRAMES images"
    local t rc=0 wall rss=-
    # Peak resident memory with GNU time where it exists (under qemu it includes the
    # emulator and its translated code, so it overstates what a device would use).
    local measure=()
    if /usr/bin/time -f '%M' -o /dev/null true 2>/dev/null; then
        measure=(/usr/bin/time -f '%M' -o "$out.rss")
    fi
    t=$(date +%s.%N)
    # In the background and waited for, so that a signal to this script reaches the trap
    # (and through it the edge) at once, not when the edge is done.
    # timeout leads a process group of its own (time, qemu, the edge): the trap ends it whole.
    timeout "$EDGE_TIMEOUT" "${measure[@]}" "$@" "${SOURCE_ARGS[@]}" --transport "$transport" \
        --output "$out.jsonl" >"$out.summary" 2>"$out.log" &
    EDGE_PID=$!
    wait "$EDGE_PID" || rc=$?
    EDGE_PID=
    wall=$(since "$t")
    [ -s "$out.rss" ] && rss=$(awk 'END { printf "%.0f", $1 / 1024 }' "$out.rss")
    sed 's/^/   /' "$out.summary"
    [ "$rc" = 0 ] || fail "edge $name over $transport exited with $rc after $wall s"
    # frames N  predictions N  errors N  accuracy A% (L labelled)
    # throughput X frames/s  latency p50 A ms  p99 B ms  mean bytes/frame N
    local summary
    summary=$(awk '
        $1 == "frames" { f = $2; p = $4; e = $6; a = $8; sub(/%/, "", a) }
        $1 == "throughput" { r = $2; p50 = $6; p99 = $9; b = $13 }
        function v(x) { return x == "" ? "-" : x }
        END { print f + 0, p + 0, e + 0, v(a), v(r), v(p50), v(p99), b + 0 }' "$out.summary")
    local frames predictions errors accuracy fps p50 p99 bytes
    read -r frames predictions errors accuracy fps p50 p99 bytes <<<"$summary"
    [ "$frames" = "$FRAMES" ] || fail "edge $name over $transport: $frames frames, expected $FRAMES"
    [ "$predictions" = "$FRAMES" ] || fail "edge $name over $transport: $predictions predictions for $FRAMES frames"
    [ "$errors" = 0 ] || fail "edge $name over $transport: $errors errors"
    awk -v a="$accuracy" -v m="$MIN_ACCURACY" 'BEGIN { exit !(a ~ /^[0-9.]+$/ && a + 0 >= m + 0) }' ||
        fail "edge $name over $transport: accuracy $accuracy% below $MIN_ACCURACY%"
    local lines
    lines=$(wc -l <"$out.jsonl")
    [ "$lines" = "$FRAMES" ] || fail "edge $name over $transport: $lines JSON lines, expected $FRAMES"
    RESULTS+=("$(printf '%-13s %-5s %6s %6s %6s %8s%% %9s %8s %8s %7s %7s %7s' \
        "$name" "$transport" "$frames" "$predictions" "$errors" "$accuracy" "$fps" "$p50" "$p99" \
        "$bytes" "$rss" "$wall")")
    done_step
}

for transport in $TRANSPORTS; do
    run_edge aarch64-qemu "$transport" "${ARM_EDGE[@]}"
done
if [ "$NATIVE_BASELINE" = 1 ]; then
    for transport in $TRANSPORTS; do
        run_edge x86-native "$transport" "${X86_EDGE[@]}"
    done
    # The aarch64 ONNX Runtime must compute what the x86 one does: the same class for every
    # image (a feature value on an int8 rounding boundary may flip one in a thousand).
    step "aarch64 against x86: the same predictions?"
    for transport in $TRANSPORTS; do
        python3 - "$TMP/edge-aarch64-qemu-$transport.jsonl" "$TMP/edge-x86-native-$transport.jsonl" "$transport" <<'EOF' ||
import json, sys
arm, x86, transport = sys.argv[1:4]
def load(path):
    with open(path) as f:
        return {r["item"]: r for r in map(json.loads, f)}
a, b = load(arm), load(x86)
same = sum(1 for k in a if k in b and a[k].get("predicted") == b[k].get("predicted"))
diff = max((abs(a[k]["score"] - b[k]["score"]) for k in a if k in b and "score" in a[k] and "score" in b[k]), default=0.0)
print(f"   {transport}: {same}/{len(a)} predictions equal, largest score difference {diff:.2e}")
sys.exit(0 if len(a) == len(b) and same >= 0.99 * len(a) else 1)
EOF
            fail "the aarch64 edge's predictions differ from the x86 edge's over $transport"
    done
    done_step
fi

log "== summary (cloud: x86-64 coordinator + 3 workers over TLS; edge: $ARM_BIN under $(basename "$QEMU") -cpu $ARM_CPU)"
printf '%-13s %-5s %6s %6s %6s %9s %9s %8s %8s %7s %7s %7s\n' \
    edge via frames preds errors accuracy "frames/s" "p50 ms" "p99 ms" "B/frame" "RSS MB" "wall s"
printf '%s\n' "${RESULTS[@]}"
log "PASS: the aarch64 edge streamed $FRAMES frames per transport ($TRANSPORTS) to the x86 cloud, 0 errors"
