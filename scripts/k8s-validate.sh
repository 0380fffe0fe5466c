#!/usr/bin/env bash
# Render every kustomization under deploy/k8s and validate it offline: no cluster needed.
#
#   scripts/k8s-validate.sh          check (CI runs this)
#   scripts/k8s-validate.sh --sync   first copy configs/{coordinator,worker,edge}.toml into
#                                    deploy/k8s/base/config/, then check
#   scripts/k8s-validate.sh --smoke  also run the dev overlay's pods as local processes
#                                    (needs a built binary and ONNX Runtime; step 7)
#
# Checks, in order; any failure makes the exit status non-zero:
#   1. deploy/k8s/base/config/*.toml are byte-for-byte copies of configs/ (kustomize reads
#      no file outside its directory, so the ConfigMap is generated from these copies);
#   2. `kubectl kustomize` renders the base, every overlay, and prod with the optional
#      queue-depth autoscaling component;
#   3. deploy/k8s/create-secrets.sh produces the three Secrets (from placeholder files);
#   4. every rendered object validates against the Kubernetes OpenAPI schemas in strict
#      mode (unknown fields are errors), for each version in K8S_VERSIONS, with PyPI's
#      kubernetes-validate in a virtual environment made on first use;
#   5. deploy/k8s/check.py: what a schema cannot say (service links off, non-root,
#      probes, grace period over the drain timeout, a worker group per top-level branch of
#      the model with an autoscaler and a disruption budget, Services that select pods
#      with the named ports, secret files that create-secrets.sh provides, etcd with
#      several coordinators, namespaces);
#   6. deploy/systemd: `systemd-analyze verify` and an exposure level of at most 2.0 for
#      the edge unit (skipped without systemd-analyze); the example edge.toml uses only
#      keys of configs/edge.toml;
#   7. with --smoke, deploy/k8s/smoke.py: coordinator, a worker per group and an edge
#      started with the rendered dev pods' args, config and environment (loopback
#      addresses, fresh dev credentials): every probe answers 200, the workers register
#      their groups, an edge streams 300 frames without error, SIGTERM exits 0 in the
#      grace period. Binary: $SPOTLIGHT, else target/release or target/debug.
#
# Environment: K8S_VERSIONS ["1.30.0 1.35.0"], K8S_VENV [build/venv-k8s].
# Needs kubectl (for `kubectl kustomize`), python3 with venv, and PyPI on first use.
set -euo pipefail
cd "$(dirname "$0")/.."

K8S_VERSIONS=${K8S_VERSIONS:-"1.30.0 1.35.0"}
VENV=${K8S_VENV:-build/venv-k8s}
VALIDATOR=kubernetes-validate==1.37.0
OUT=build/k8s
CONFIGS=(coordinator worker edge)
started=$SECONDS
fail=0

step() { printf '== k8s: %s\n' "$*"; }
bad() { printf '  FAIL %s\n' "$*"; fail=1; }

sync=0 smoke=0
for arg in "$@"; do
  case "$arg" in
    --sync) sync=1 ;;
    --smoke) smoke=1 ;;
    *) echo "usage: scripts/k8s-validate.sh [--sync] [--smoke]" >&2; exit 2 ;;
  esac
done
if [ "$sync" = 1 ]; then
  for c in "${CONFIGS[@]}"; do cp "configs/$c.toml" "deploy/k8s/base/config/$c.toml"; done
  echo "copied configs/{$(IFS=,; echo "${CONFIGS[*]}")}.toml to deploy/k8s/base/config/"
fi

step "config copies equal configs/"
for c in "${CONFIGS[@]}"; do
  if cmp -s "configs/$c.toml" "deploy/k8s/base/config/$c.toml"; then
    echo "  ok   deploy/k8s/base/config/$c.toml"
  else
    bad "deploy/k8s/base/config/$c.toml differs from configs/$c.toml (run scripts/k8s-validate.sh --sync):"
    diff -u "configs/$c.toml" "deploy/k8s/base/config/$c.toml" | sed 's/^/       /' | head -20 || true
  fi
done

command -v kubectl >/dev/null || { echo "k8s-validate: kubectl is needed for 'kubectl kustomize'" >&2; exit 1; }

step "render ($(kubectl version --client 2>/dev/null | sed -n 's/^Kustomize Version: /kustomize /p'))"
rm -rf "$OUT" && mkdir -p "$OUT/rendered" "$OUT/prod-queue-depth" "$OUT/placeholder-secrets"
# prod with the optional component, as an operator would enable it.
cat > "$OUT/prod-queue-depth/kustomization.yaml" <<'EOF'
apiVersion: kustomize.config.k8s.io/v1beta1
kind: Kustomization
resources:
  - ../../../deploy/k8s/overlays/prod
components:
  - ../../../deploy/k8s/components/queue-depth-hpa
EOF
renders=(base=deploy/k8s/base)
for o in deploy/k8s/overlays/*/; do o=${o%/}; renders+=("${o##*/}=$o"); done
renders+=(prod-queue-depth="$OUT/prod-queue-depth")
rendered=()
for r in "${renders[@]}"; do
  name=${r%%=*} dir=${r#*=} file="$OUT/rendered/${r%%=*}.yaml"
  if kubectl kustomize "$dir" > "$file" 2> "$file.err"; then
    echo "  ok   $dir: $(grep -c '^kind:' "$file") objects ($(grep '^kind:' "$file" | sort | uniq -c | awk '{printf "%s%s %s", sep, $1, $3; sep=", "}'))"
    rendered+=("$name=$file")
  else
    bad "$dir does not render:"; sed 's/^/       /' "$file.err"
  fi
done

step "secrets from deploy/k8s/create-secrets.sh"
for f in ca.pem coordinator.pem coordinator.key tokens.toml coordinator.token worker.pem \
         worker.key worker.token edge.pem edge.key edge.token; do
  echo placeholder > "$OUT/placeholder-secrets/$f"
done
secrets=$OUT/rendered/secrets.yaml
if deploy/k8s/create-secrets.sh --from "$OUT/placeholder-secrets" -n spotlight --print > "$secrets"; then
  echo "  ok   $(grep -c '^kind: Secret' "$secrets") Secrets: $(sed -n 's/^  name: //p' "$secrets" | paste -sd, -)"
else
  bad "create-secrets.sh --print failed"
fi

step "schemas ($VALIDATOR, strict, Kubernetes $K8S_VERSIONS)"
if ! "$VENV/bin/kubernetes-validate" --version 2>/dev/null | grep -qx "${VALIDATOR#*==}"; then
  echo "  installing $VALIDATOR into $VENV"
  rm -rf "$VENV"
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install --quiet --disable-pip-version-check "$VALIDATOR"
fi
for v in $K8S_VERSIONS; do
  for f in "$OUT"/rendered/*.yaml; do
    n=$(grep -c '^kind:' "$f")
    if log=$("$VENV/bin/kubernetes-validate" --strict --quiet -k "$v" "$f" 2>&1); then
      echo "  ok   $v ${f##*/}: $n objects"
    else
      bad "$v ${f##*/}:"; printf '%s\n' "$log" | sed 's/^/       /'
    fi
  done
done

step "manifest checks (deploy/k8s/check.py)"
if [ ${#rendered[@]} -gt 0 ]; then
  "$VENV/bin/python" deploy/k8s/check.py \
    --model-manifest models/fashion-mnist-nested-v2/manifest.json \
    --configs deploy/k8s/base/config --secrets "$secrets" "${rendered[@]}" || fail=1
fi

step "systemd unit for bare devices (deploy/systemd)"
unit=deploy/systemd/spotlight-edge.service
if command -v systemd-analyze >/dev/null; then
  # The binary is not installed here; every other complaint is a defect of the unit.
  # --threshold counts tenths: 20 is an exposure level of 2.0 (0 best, 10 worst).
  log=$(systemd-analyze verify "$unit" 2>&1 | grep -v 'Command /usr/local/bin/spotlight is not executable' || true)
  if [ -z "$log" ]; then echo "  ok   systemd-analyze verify $unit"
  else bad "systemd-analyze verify $unit:"; printf '%s\n' "$log" | sed 's/^/       /'; fi
  if exposure=$(systemd-analyze security --offline=yes --threshold=20 "$unit" 2>&1); then
    echo "  ok   exposure $(printf '%s\n' "$exposure" | sed -n 's/.*exposure level for [^:]*: \([0-9.]*\).*/\1/p') (at most 2.0)"
  else
    bad "systemd-analyze security: exposure above 2.0:"; printf '%s\n' "$exposure" | grep '✗' | sed 's/^/       /'
  fi
else
  echo "  skipped systemd-analyze checks: systemd-analyze is not installed"
fi
# The example config only uses keys of the reference file.
if "$VENV/bin/python" - deploy/systemd/edge.toml configs/edge.toml <<'EOF'
import re, sys, tomllib
example, reference = sys.argv[1], sys.argv[2]
cfg = tomllib.load(open(example, "rb"))
known = set(re.findall(r"^#?\s*([a-z_]+)\s*=", open(reference).read(), re.M))
sections = set(re.findall(r"^#?\s*\[([a-z_.]+)\]", open(reference).read(), re.M))
unknown = [k for k, v in cfg.items() if not isinstance(v, dict) and k not in known]
unknown += [f"{s}.{k}" for s, t in cfg.items() if isinstance(t, dict) for k in t if k not in known]
unknown += [s for s, t in cfg.items() if isinstance(t, dict) and s not in sections]
if unknown:
    sys.exit(f"  FAIL {example}: keys not in {reference}: {', '.join(unknown)}")
print(f"  ok   {example}: valid TOML, every key in {reference}")
EOF
then :; else fail=1; fi

if [ "$smoke" = 1 ]; then
  step "smoke: the dev overlay's pods as local processes (deploy/k8s/smoke.py)"
  bin=${SPOTLIGHT:-}
  for b in target/release/spotlight target/debug/spotlight; do
    [ -z "$bin" ] && [ -x "$b" ] && bin=$b
  done
  export ORT_DYLIB_PATH=${ORT_DYLIB_PATH:-$PWD/build/onnxruntime/libonnxruntime.so}
  if [ -z "$bin" ] || [ ! -f "$ORT_DYLIB_PATH" ] || [ ! -f "$OUT/rendered/dev.yaml" ]; then
    bad "--smoke needs a built spotlight (or SPOTLIGHT=PATH), ONNX Runtime (make onnxruntime) and the dev render"
  else
    # Absolute: the pods run in their own working directories.
    bin=$(realpath "$bin")
    "$VENV/bin/python" deploy/k8s/smoke.py "$OUT/rendered/dev.yaml" --bin "$bin" --work "$OUT/smoke" || fail=1
  fi
fi

if [ "$fail" = 0 ]; then
  step "all passed in $((SECONDS - started)) s (rendered manifests in $OUT/rendered)"
else
  step "FAILED (see FAIL lines above)"
fi
exit "$fail"
