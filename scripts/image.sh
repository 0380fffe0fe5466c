#!/usr/bin/env bash
# Builds the spotlight container image (deploy/Containerfile) from Debian packages alone and
# smoke-tests it: `spotlight --version`, the non-root user, the model mounted from outside,
# and a short `spotlight up` (every role in one container, TLS on, Fashion-MNIST mounted
# read-only). Idempotent and CI-safe (no input); see docs/container.md.
#
#   scripts/image.sh
#
# Steps: install podman, runc and mmdebstrap with apt where missing; make two base images
# with mmdebstrap (a build base with unzip and binutils, a runtime base with only libc,
# libgcc and libstdc++), cached as tarballs under build/image/ and as images keyed by their
# recipe; build the image with podman (--storage-driver vfs, runc, no network); run it.
#
# Environment:
#   SPOTLIGHT_BIN=PATH            use this spotlight binary instead of
#                                 `cargo build --release --bin spotlight`
#   SPOTLIGHT_IMAGE=NAME          image to build [localhost/spotlight:latest]
#   SPOTLIGHT_IMAGE_FRAMES=N      frames the `spotlight up` check streams [2000]
#   SPOTLIGHT_IMAGE_SUITE=NAME    Debian suite of the bases [the host's, else bookworm]
#   SPOTLIGHT_IMAGE_STRICT=1      a skip (no root, podman unusable here) fails instead
#   SPOTLIGHT_PODMAN_DRIVER=NAME  podman storage driver [vfs]; overlay works on some machines
#                                 and is faster, but a storage root keeps the driver it was
#                                 made with: give it its own SPOTLIGHT_PODMAN_ROOT
#   SPOTLIGHT_PODMAN_ROOT=DIR     podman storage root [podman's default]
#   CONTAINERS_CONF=FILE          podman engine settings [deploy/containers.conf]
#
# Exit status: 0 built and checked, or skipped (the reason is printed on a line starting
# with "SKIP"); 1 a step failed.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
# A relative SPOTLIGHT_BIN is relative to where the script was started from.
if [ -n "${SPOTLIGHT_BIN:-}" ] && [ -e "$SPOTLIGHT_BIN" ]; then
    SPOTLIGHT_BIN=$(realpath "$SPOTLIGHT_BIN")
fi
cd "$ROOT"

IMAGE=${SPOTLIGHT_IMAGE:-localhost/spotlight:latest}
FRAMES=${SPOTLIGHT_IMAGE_FRAMES:-2000}
STRICT=${SPOTLIGHT_IMAGE_STRICT:-0}
DATASET=/usr/share/datasets/fashion-mnist
ORT_VERSION=1.31.1
WORK=build/image
DRIVER=${SPOTLIGHT_PODMAN_DRIVER:-vfs}
export CONTAINERS_CONF=${CONTAINERS_CONF:-$ROOT/deploy/containers.conf}
export ORT_DISABLE_TELEMETRY=1 DEBIAN_FRONTEND=noninteractive

START=$SECONDS
PHASE_START=$SECONDS
trap 'echo "FAIL image: line $LINENO: $BASH_COMMAND (exit $?)" >&2' ERR
step() {
    echo "== image: $* (at ${SECONDS}s)"
    PHASE_START=$SECONDS
}
done_step() { echo "   ($((SECONDS - PHASE_START)) s)"; }
skip() {
    echo "SKIP image: $*"
    if [ "$STRICT" = 1 ]; then
        echo "SPOTLIGHT_IMAGE_STRICT=1: a skip is a failure" >&2
        exit 1
    fi
    exit 0
}
fail() {
    echo "FAIL image: $*" >&2
    exit 1
}

pod() {
    local flags=(--storage-driver "$DRIVER")
    if [ -n "${SPOTLIGHT_PODMAN_ROOT:-}" ]; then
        flags+=(--root "$SPOTLIGHT_PODMAN_ROOT/storage" --runroot "$SPOTLIGHT_PODMAN_ROOT/run")
    fi
    podman "${flags[@]}" "$@"
}

# ---------------------------------------------------------------------------------------
step "prerequisites"
[ "$(uname -m)" = x86_64 ] || skip "the image recipe is for x86_64 hosts (this is $(uname -m))"
[ "$(id -u)" = 0 ] || skip "needs root (mmdebstrap's root mode and rootful podman); run it with sudo"

need=()
command -v podman >/dev/null || need+=(podman)
command -v runc >/dev/null || need+=(runc)
command -v mmdebstrap >/dev/null || need+=(mmdebstrap)
[ -f "$DATASET/t10k-images-idx3-ubyte.gz" ] || need+=(dataset-fashion-mnist)
if [ ${#need[@]} -gt 0 ]; then
    command -v apt-get >/dev/null || skip "missing ${need[*]} and no apt-get to install them"
    echo "installing: ${need[*]}"
    apt-get -o DPkg::Lock::Timeout=600 update -qq
    # No recommends: crun (refused here), CNI plugins and fuse-overlayfs are not needed.
    apt-get -o DPkg::Lock::Timeout=600 install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
if ! info_err=$(pod info 2>&1 >/dev/null); then
    skip "podman cannot start here: $(printf '%s\n' "$info_err" | tail -n 1)"
fi
done_step

# ---------------------------------------------------------------------------------------
# Base images from Debian packages. Each recipe is an mmdebstrap command line; its hash
# names the tarball and the image tag, so a changed recipe makes a new base and an
# unchanged one is never rebuilt (not even in a fresh clone while podman's store has it).
SUITE=${SPOTLIGHT_IMAGE_SUITE:-}
if [ -z "$SUITE" ]; then
    SUITE=$(. /etc/os-release 2>/dev/null && [ "${ID:-}" = debian ] && echo "${VERSION_CODENAME:-}") || true
    SUITE=${SUITE:-bookworm}
fi
trim=(--dpkgopt='path-exclude=/usr/share/man/*' --dpkgopt='path-exclude=/usr/share/info/*'
      --dpkgopt='path-exclude=/usr/share/locale/*' --dpkgopt='path-exclude=/usr/share/lintian/*'
      --dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-include=/usr/share/doc/*/copyright')
# "extract" unpacks the packages and their dependencies without Debian's essential set (no
# perl, no apt); the merged-usr hook lays out /bin -> usr/bin; passwd and group come from
# base-passwd's master files, as its postinst would have written them.
common=(--variant=extract --hook-dir=/usr/share/mmdebstrap/hooks/merged-usr
        --aptopt='Acquire::Retries "3"'
        --customize-hook='cp "$1/usr/share/base-passwd/passwd.master" "$1/etc/passwd"'
        --customize-hook='cp "$1/usr/share/base-passwd/group.master" "$1/etc/group"'
        --customize-hook='rm -rf "$1/var/cache/apt" "$1/var/lib/apt/lists"')
# Runtime: the binary links libc and libgcc_s; ONNX Runtime also needs libstdc++. dash for
# RUN and `podman exec … sh`; gconv modules dropped (nothing here converts charsets).
# shellcheck disable=SC2054 # the commas separate mmdebstrap's package names
RUNTIME_RECIPE=("${common[@]}" "${trim[@]}"
    --dpkgopt='path-exclude=/usr/lib/x86_64-linux-gnu/gconv/*'
    --include=base-files,base-passwd,dash,libc6,libgcc-s1,libstdc++6)
# Build: what the Containerfile's first stage runs (sha256sum, unzip, strip).
# shellcheck disable=SC2054
BUILD_RECIPE=("${common[@]}" "${trim[@]}"
    --include=base-files,base-passwd,dash,coreutils,unzip,binutils)

mkdir -p "$WORK"
key_of() { printf '%s\n' "$SUITE" "$@" | sha256sum | cut -c1-12; }
make_tar() { # NAME TAR RECIPE...: one mmdebstrap run (the two run side by side)
    local name=$1 tar=$2
    shift 2
    rm -rf "$tar.partial"
    if ! mmdebstrap --format=tar "$@" "$SUITE" "$tar.partial" >"$WORK/mmdebstrap-$name.log" 2>&1; then
        tail -n 30 "$WORK/mmdebstrap-$name.log" >&2
        echo "FAIL image: mmdebstrap of the $name base failed (log: $WORK/mmdebstrap-$name.log)" >&2
        return 1
    fi
    mv "$tar.partial" "$tar"
}
import_tar() { # TAR REF
    pod import --quiet --change 'CMD ["/bin/sh"]' "$1" "$2" >/dev/null || fail "podman import of $1 failed"
}
step "base images ($SUITE)"
rt_key=$(key_of "${RUNTIME_RECIPE[@]}")
bd_key=$(key_of "${BUILD_RECIPE[@]}")
RUNTIME_BASE=localhost/spotlight-base:runtime-$SUITE-$rt_key
BUILD_BASE=localhost/spotlight-base:build-$SUITE-$bd_key
rt_tar=$WORK/base-runtime-$SUITE-$rt_key.tar
bd_tar=$WORK/base-build-$SUITE-$bd_key.tar
pids=()
for ref in "$RUNTIME_BASE" "$BUILD_BASE"; do
    if [ "$ref" = "$RUNTIME_BASE" ]; then tar=$rt_tar name=runtime; else tar=$bd_tar name=build; fi
    if pod image exists "$ref"; then
        echo "   $ref: cached image"
    elif [ -s "$tar" ]; then
        echo "   $ref: cached tarball $tar"
    else
        echo "   $ref: mmdebstrap $SUITE -> $tar"
        if [ $name = runtime ]; then
            make_tar runtime "$tar" "${RUNTIME_RECIPE[@]}" &
        else
            make_tar build "$tar" "${BUILD_RECIPE[@]}" &
        fi
        pids+=($!)
    fi
done
for pid in "${pids[@]}"; do
    wait "$pid" || fail "a base image could not be made"
done
pod image exists "$RUNTIME_BASE" || import_tar "$rt_tar" "$RUNTIME_BASE"
pod image exists "$BUILD_BASE" || import_tar "$bd_tar" "$BUILD_BASE"
pod tag "$RUNTIME_BASE" localhost/spotlight-base:runtime
pod tag "$BUILD_BASE" localhost/spotlight-base:build
done_step

# Can this machine run a container at all? Anything failing here is the environment (a
# sandbox refusing namespaces, mounts or rlimits), not the image: skip with its reason.
step "probe: run a container"
if ! probe=$(pod run --rm --network none --pull never "$RUNTIME_BASE" /bin/sh -c 'echo ok' 2>&1) \
    || [ "$(printf '%s' "$probe" | tail -n 1)" != ok ]; then
    skip "podman cannot run a container here: $(printf '%s\n' "$probe" | tail -n 1)"
fi
done_step

# ---------------------------------------------------------------------------------------
step "inputs: binary and ONNX Runtime wheel"
if [ -n "${SPOTLIGHT_BIN:-}" ]; then
    [ -x "$SPOTLIGHT_BIN" ] || fail "SPOTLIGHT_BIN=$SPOTLIGHT_BIN is not an executable"
    bin=$SPOTLIGHT_BIN
else
    cargo build --release --bin spotlight
    bin=target/release/spotlight
fi
# The build context admits only build/image/spotlight (and target/release/spotlight) of
# binaries (.dockerignore); copy it in wherever it was built.
if ! cmp -s "$bin" "$WORK/spotlight"; then
    cp "$bin" "$WORK/spotlight.partial"
    mv "$WORK/spotlight.partial" "$WORK/spotlight"
fi
wheel=$(sed -n 's/^ARG ORT_WHEEL=//p' deploy/Containerfile)
if [ ! -f "build/wheels/$wheel" ]; then
    mkdir -p build/wheels
    python3 -m pip download --quiet --no-deps --only-binary=:all: --dest build/wheels \
        --python-version 3.11 --platform manylinux_2_27_x86_64 --platform manylinux_2_28_x86_64 \
        "onnxruntime==$ORT_VERSION"
    [ -f "build/wheels/$wheel" ] || fail "pip did not fetch build/wheels/$wheel"
fi
echo "   binary $bin ($(du -h "$bin" | cut -f1)), wheel build/wheels/$wheel"
done_step

# ---------------------------------------------------------------------------------------
step "build $IMAGE"
old_id=$(pod image inspect --format '{{.Id}}' "$IMAGE" 2>/dev/null || true)
version=$("$WORK/spotlight" --version | awk '{print $2}')
revision=$(git rev-parse HEAD 2>/dev/null || echo unknown)
git diff --quiet HEAD 2>/dev/null || revision="$revision-dirty"
pod build --quiet --pull=never --network=none --layers \
    -f deploy/Containerfile \
    --build-arg BUILD_BASE="$BUILD_BASE" \
    --build-arg RUNTIME_BASE="$RUNTIME_BASE" \
    --build-arg SPOTLIGHT_BIN="$WORK/spotlight" \
    --label org.opencontainers.image.version="$version" \
    --label org.opencontainers.image.revision="$revision" \
    -t "$IMAGE" . >"$WORK/build.log" 2>&1 || {
    tail -n 40 "$WORK/build.log" >&2
    fail "podman build failed (log: $WORK/build.log)"
}
new_id=$(pod image inspect --format '{{.Id}}' "$IMAGE")
# vfs keeps a full copy per layer: let go of the image this tag pointed at before
# (`podman image prune` then frees its layers).
if [ -n "$old_id" ] && [ "$old_id" != "$new_id" ]; then
    pod rmi "$old_id" >/dev/null 2>&1 || true
fi
done_step

# ---------------------------------------------------------------------------------------
step "check: --version, user, model"
out=$(pod run --rm --network none --pull never "$IMAGE" --version)
echo "   $out"
[ "$out" = "spotlight $version" ] || fail "expected 'spotlight $version', got '$out'"
# The user the image runs as, read by the shell from /proc (the runtime base has no `id`).
uid=$(pod run --rm --network none --pull never --entrypoint /bin/sh "$IMAGE" -c \
    'while read -r k r e _; do [ "$k" != Uid: ] || echo "$r $e"; done </proc/self/status')
echo "   uid (real effective): $uid"
case "$uid" in "0 "* | *" 0") fail "the image runs as root" ;; esac
# The baked-in model and the same package mounted from outside have the same hash.
baked=$(pod run --rm --network none --pull never "$IMAGE" inspect | head -n 1)
mounted=$(pod run --rm --network none --pull never \
    -v "$ROOT/models/fashion-mnist-nested-v2:/models/mounted:ro" \
    "$IMAGE" inspect --model /models/mounted | head -n 1)
echo "   baked:   $baked"
echo "   mounted: $mounted"
[ -n "$baked" ] && [ "${baked#* }" = "${mounted#* }" ] || fail "baked and mounted model differ"
done_step

step "check: spotlight up --limit $FRAMES (TLS, read-only root, no capabilities, no network)"
# The loopback interface is all `up` needs: its roles talk over 127.0.0.1 inside the
# container. --read-only gives /tmp a tmpfs, where `up` writes its throwaway credentials.
pod run --rm --network none --pull never --read-only --cap-drop all \
    --security-opt no-new-privileges \
    -v "$DATASET:$DATASET:ro" \
    "$IMAGE" up --limit "$FRAMES" >"$WORK/up.log" 2>&1 || {
    tail -n 30 "$WORK/up.log" >&2
    fail "spotlight up failed in the container (log: $WORK/up.log)"
}
grep -E '^(frames|throughput|task v)' "$WORK/up.log" | sed 's/^/   /'
summary=$(grep -E '^frames [0-9]+' "$WORK/up.log" || true)
predictions=$(sed -n 's/.*predictions \([0-9]*\).*/\1/p' <<<"$summary")
errors=$(sed -n 's/.*errors \([0-9]*\).*/\1/p' <<<"$summary")
[ -n "$predictions" ] && [ "$predictions" -gt 0 ] || fail "no predictions (log: $WORK/up.log)"
[ "$predictions" = "$FRAMES" ] || fail "$predictions predictions for $FRAMES frames"
[ "$errors" = 0 ] || fail "$errors errors (log: $WORK/up.log)"
grep -q '^task v2:' "$WORK/up.log" || fail "the task switch did not happen (log: $WORK/up.log)"
done_step

# The deployed shape in miniature: coordinator, two workers and an edge agent, each in a
# container of its own, sharing one network namespace (the coordinator's, which has only
# loopback), TLS and tokens from `spotlight certs` mounted read-only as the secrets; the
# task changed by an operator container; every role stopped with SIGTERM as PID 1.
step "check: roles in separate containers (certs, coordinator, 2 workers, task set, edge)"
run=spotlight-image-check-$$
cleanup() {
    for c in edge operator w-tops w-rest coordinator; do
        pod rm -f -t 0 "$run-$c" >/dev/null 2>&1 || true
    done
}
trap cleanup EXIT
secrets="$ROOT/$WORK/secrets"
rm -rf "$secrets"
mkdir -p "$secrets"
chown 10001:10001 "$secrets"
pod run --rm --network none --pull never -v "$secrets:/secrets" "$IMAGE" certs --out /secrets >/dev/null
S=/etc/spotlight/secrets
role() { # NAME ARGS...: a detached role container in the coordinator's network namespace
    local name=$1
    shift
    local net=(--network "container:$run-coordinator")
    [ "$name" = coordinator ] && net=(--network none)
    pod run -d --name "$run-$name" "${net[@]}" --pull never --read-only --cap-drop all \
        --security-opt no-new-privileges -v "$secrets:$S:ro" "$IMAGE" "$@" >/dev/null
}
once() { # ARGS...: a role run to completion in the coordinator's network namespace
    pod run --rm --network "container:$run-coordinator" --pull never --read-only --cap-drop all \
        --security-opt no-new-privileges -v "$secrets:$S:ro" -v "$DATASET:$DATASET:ro" "$IMAGE" "$@"
}
role coordinator coordinator --grpc-listen 127.0.0.1:7000 --http-listen 127.0.0.1:7080 \
    --ca $S/ca.pem --cert $S/coordinator.pem --key $S/coordinator.key \
    --tokens $S/tokens.toml --token-file $S/coordinator.token
W=(--coordinator https://127.0.0.1:7000 --ca "$S/ca.pem" --cert "$S/worker.pem" --key "$S/worker.key"
   --tokens "$S/tokens.toml" --token-file "$S/worker.token")
# The containers share one network namespace: each worker gets its own probe/metrics port.
role w-tops worker --listen 127.0.0.1:7001 --advertise https://127.0.0.1:7001 \
    --http-listen 127.0.0.1:7081 --branches tops "${W[@]}"
role w-rest worker --listen 127.0.0.1:7002 --advertise https://127.0.0.1:7002 \
    --http-listen 127.0.0.1:7082 --branches footwear,other "${W[@]}"
for _ in $(seq 100); do
    [ "$(pod logs "$run-coordinator" 2>&1 | grep -c 'worker registered')" -ge 2 ] && break
    sleep 0.2
done
[ "$(pod logs "$run-coordinator" 2>&1 | grep -c 'worker registered')" -ge 2 ] \
    || { pod logs "$run-coordinator" 2>&1 | tail -n 20 >&2; fail "workers did not register"; }
task=$(once task set --coordinator https://127.0.0.1:7000 --ca $S/ca.pem \
    --token-file $S/operator.token --categories "Sandal,Sneaker,Ankle boot")
echo "   task set: $task"
once edge --coordinator https://127.0.0.1:7000 --ca $S/ca.pem --token-file $S/edge.token \
    --idx-images "$DATASET/t10k-images-idx3-ubyte.gz" --idx-labels "$DATASET/t10k-labels-idx1-ubyte.gz" \
    --limit "$FRAMES" >"$WORK/edge.log" 2>&1 || {
    tail -n 30 "$WORK/edge.log" >&2
    fail "the edge container failed (log: $WORK/edge.log)"
}
grep -E '^(frames|throughput|task v)' "$WORK/edge.log" | sed 's/^/   /'
grep -qE "^frames $FRAMES +predictions $FRAMES +errors 0 " "$WORK/edge.log" \
    || fail "expected $FRAMES predictions and no error (log: $WORK/edge.log)"
# Every frame under the footwear task, so only the footwear branch ran in the cloud (the
# default package's footwear branch: 8 806 104 of 26 418 384 cloud MACs, its model card).
grep -qE "^task v2: predictions $FRAMES .*cloud MACs/frame 8806104 of 26418384" "$WORK/edge.log" \
    || fail "the task change did not reach the edge's frames (log: $WORK/edge.log)"
for c in w-tops w-rest coordinator; do
    pod stop -t 15 "$run-$c" >/dev/null
    code=$(pod inspect --format '{{.State.ExitCode}}' "$run-$c")
    [ "$code" = 0 ] || { pod logs "$run-$c" 2>&1 | tail -n 20 >&2; fail "$c exited $code on SIGTERM"; }
done
echo "   SIGTERM: workers and coordinator drained and exited 0"
cleanup
trap - EXIT
rm -rf "$secrets"
done_step

# ---------------------------------------------------------------------------------------
size=$(pod image inspect --format '{{.Size}}' "$IMAGE")
base_size=$(pod image inspect --format '{{.Size}}' "$RUNTIME_BASE")
echo "== image: $IMAGE $(awk -v s="$size" 'BEGIN{printf "%.1f MB", s/1e6}') " \
    "(runtime base $(awk -v s="$base_size" 'BEGIN{printf "%.1f MB", s/1e6}'))"
pod image inspect --format '   labels: {{index .Labels "org.opencontainers.image.version"}} {{index .Labels "org.opencontainers.image.revision"}}' "$IMAGE"
pod history --format '{{.Size}}\t{{.CreatedBy}}' "$IMAGE" | grep -v '^0 B' | cut -c1-100 | sed 's/^/   /'
echo "   storage: $DRIVER, $(pod info --format '{{.Store.GraphRoot}}')"
echo "== image: passed in $((SECONDS - START)) s"
