# spotlight — every set-up step the README's two commands need, idempotent.
#   make demo   the demo: every role in one process, Fashion-MNIST test set, task switch
#   make test   every test: Rust (unit + integration) and Python (model authoring)
#   make fuzz   every cargo-fuzz target for a bounded time (nightly; docs/fuzzing.md)

SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
ORT_VERSION := 1.31.1
ORT_LIB := build/onnxruntime/libonnxruntime.so
DATASET := /usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz
CARGO ?= cargo
export ORT_DISABLE_TELEMETRY := 1

.PHONY: demo test test-rust test-python setup onnxruntime dataset protoc etcd venv model model-v1 lint bench fuzz k8s-validate k8s-smoke image arm-edge

# Debian packages, installed when missing (as root, or through sudo).
APT_INSTALL = if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi; \
	$$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq

demo: onnxruntime dataset protoc
	$(CARGO) build --release --bin spotlight
	./target/release/spotlight up

test: onnxruntime dataset protoc etcd venv
	$(CARGO) test --workspace --all-targets
	$(VENV)/bin/python -m pytest -q python/tests

test-rust: onnxruntime dataset protoc etcd
	$(CARGO) test --workspace --all-targets

test-python: dataset venv
	$(VENV)/bin/python -m pytest -q python/tests

setup: onnxruntime dataset protoc etcd venv

# The ONNX Runtime shared library, taken from the PyPI wheel (Debian has no package and ort
# cannot download binaries here). Only the wheel is fetched, not the Python package's deps.
onnxruntime: $(ORT_LIB)
$(ORT_LIB):
	mkdir -p build/wheels build/onnxruntime
	$(PYTHON) -m pip download --quiet --no-deps --only-binary=:all: --dest build/wheels \
		--python-version 3.11 --platform manylinux_2_27_x86_64 --platform manylinux_2_28_x86_64 \
		onnxruntime==$(ORT_VERSION)
	$(PYTHON) -c 'import glob, zipfile, shutil, sys; \
		w = zipfile.ZipFile(sorted(glob.glob("build/wheels/onnxruntime-$(ORT_VERSION)-*.whl"))[-1]); \
		n = [m for m in w.namelist() if m.startswith("onnxruntime/capi/libonnxruntime.so")][0]; \
		shutil.copyfileobj(w.open(n), open("$(ORT_LIB)", "wb")); print("installed", n, "->", "$(ORT_LIB)")'

# Fashion-MNIST from Debian (idx .gz files under /usr/share/datasets/fashion-mnist/).
dataset: $(DATASET)
$(DATASET):
	$(APT_INSTALL) dataset-fashion-mnist

# protoc for the etcd client's generated code (our own protos use the vendored protoc).
protoc: /usr/bin/protoc
/usr/bin/protoc:
	$(APT_INSTALL) protobuf-compiler

# etcd for the coordinator-replica tests (tests/cluster: a real etcd on loopback).
etcd: /usr/bin/etcd
/usr/bin/etcd:
	$(APT_INSTALL) etcd-server

# Python for the model-authoring code and its tests (torch from PyPI brings CUDA packages:
# ~2.8 GB download, 5.5 GB installed, a few minutes). No pip cache: it would keep a second
# 2.8 GB copy of the wheels on disk.
venv: $(VENV)/.installed
$(VENV)/.installed: python/requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --no-cache-dir -r python/requirements.txt
	touch $@

# Every benchmark scenario side by side in one run; rewrites docs/benchmarks.md and its plots.
bench: onnxruntime dataset protoc
	$(CARGO) build --release --bin spotlight
	./target/release/spotlight bench --out docs/bench --markdown docs/benchmarks.md

# Every cargo-fuzz target for a bounded time, one after another (docs/fuzzing.md; needs
# nightly). FUZZ=300 gives each 300 s; FUZZ=-runs=1000000 a million executions each.
FUZZ ?= 60
fuzz:
	scripts/fuzz.sh $(FUZZ)

# Retrain and re-export the default model package, v2 (see python/README.md and its card).
model: dataset venv
	PYTHONPATH=python $(VENV)/bin/python -m spotlight_model all --tree python/trees/fashion_mnist_v2.json \
		--epochs 30 --distill 0.5 --work build/model-work-fashion-mnist-nested-v2 --out models/fashion-mnist-nested-v2

# The v1 package, kept beside the default (the tests' fixed reference; see its card).
model-v1: dataset venv
	PYTHONPATH=python $(VENV)/bin/python -m spotlight_model all --out models/fashion-mnist-nested

lint: protoc
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

# Kubernetes manifests and the edge's systemd unit, rendered and validated offline (docs/kubernetes.md).
k8s-validate:
	scripts/k8s-validate.sh

# The same, plus the dev overlay's pods run as local processes with their rendered configuration.
k8s-smoke: onnxruntime dataset protoc
	$(CARGO) build --release --bin spotlight
	scripts/k8s-validate.sh --smoke

# The container image (deploy/Containerfile): bases from Debian packages (mmdebstrap), built
# with podman and checked (--version, spotlight up, every role in its own container). Needs
# root; prints SKIP and exits 0 where podman cannot run. See docs/container.md.
image: onnxruntime dataset protoc
	$(CARGO) build --release --bin spotlight
	SPOTLIGHT_BIN=target/release/spotlight scripts/image.sh

# The edge agent cross-built for aarch64 and run under qemu-user against the x86 cloud roles,
# gRPC and QUIC over TLS (docs/edge-install.md); prints SKIP where it cannot emulate.
arm-edge: onnxruntime dataset protoc
	scripts/arm-edge.sh
