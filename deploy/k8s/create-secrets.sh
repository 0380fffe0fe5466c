#!/usr/bin/env bash
# Create (or rotate) the Secrets the spotlight manifests mount, from the files that
# `spotlight certs` writes. Each role gets only what it needs; ca.key, the operator's and
# the reader's credentials never enter the cluster.
#
#   deploy/k8s/create-secrets.sh -n NAMESPACE [--from DIR] [--host NAME]... [--print]
#
#   -n NAMESPACE  namespace of the Secrets (spotlight-dev for the dev overlay, spotlight
#                 for prod)                                                   [spotlight]
#   --from DIR    use an existing `spotlight certs` directory (your own CA's files work
#                 when named the same way). Without it, runs `spotlight certs --out
#                 secrets-NAMESPACE` first, with the coordinator's in-cluster names and
#                 every --host, and keeps that directory: operator.token and ca.pem in it
#                 are what you use to change the task.
#   --host NAME   extra name or address the coordinator's certificate must carry, e.g. the
#                 address edges outside the cluster dial (repeatable)
#   --print       print the Secret manifests instead of applying them
#
# Applying again replaces the Secrets in place (rotation): the servers re-read mounted
# files within reload_ms; clients (edge, worker as a client) read theirs at start-up, so
# restart them: kubectl -n NS rollout restart deployment,daemonset
# SPOTLIGHT names the spotlight binary [spotlight on PATH, else target/release/spotlight].
set -euo pipefail

ns=spotlight from="" print=0 hosts=()
while [ $# -gt 0 ]; do
  case "$1" in
    -n|--namespace) ns=$2; shift 2 ;;
    --from) from=$2; shift 2 ;;
    --host) hosts+=("$2"); shift 2 ;;
    --print) print=1; shift ;;
    -h|--help) sed -n '2,24p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "create-secrets: unknown argument \"$1\" (see --help)" >&2; exit 2 ;;
  esac
done

if [ -z "$from" ]; then
  bin=${SPOTLIGHT:-}
  if [ -z "$bin" ]; then
    if command -v spotlight >/dev/null; then bin=spotlight
    else bin="$(cd "$(dirname "$0")/../.." && pwd)/target/release/spotlight"; fi
  fi
  [ -x "$(command -v "$bin")" ] || { echo "create-secrets: no spotlight binary (set SPOTLIGHT=PATH or build it)" >&2; exit 1; }
  from=secrets-$ns
  # spotlight-coordinator and spotlight-worker are always in the certificates; the
  # qualified Service names let clients in other namespaces verify the coordinator.
  args=(--host "spotlight-coordinator.$ns.svc" --host "spotlight-coordinator.$ns.svc.cluster.local")
  for h in ${hosts[@]+"${hosts[@]}"}; do args+=(--host "$h"); done
  "$bin" certs --out "$from" "${args[@]}" >&2
  echo "create-secrets: credentials in $from (keep ca.key and operator.token out of the cluster)" >&2
fi

secret() { # NAME FILE...
  local name=$1; shift
  local a=()
  for f in "$@"; do
    [ -f "$from/$f" ] || { echo "create-secrets: $from/$f is missing" >&2; exit 1; }
    a+=("--from-file=$f=$from/$f")
  done
  echo "---"
  kubectl create secret generic "$name" -n "$ns" "${a[@]}" --dry-run=client -o yaml
}

manifests=$(
  secret spotlight-coordinator-secrets ca.pem coordinator.pem coordinator.key tokens.toml coordinator.token
  secret spotlight-worker-secrets ca.pem worker.pem worker.key tokens.toml worker.token
  # edge.pem/edge.key are presented only with mtls; shipped so that turning it on needs
  # no new Secret.
  secret spotlight-edge-secrets ca.pem edge.token edge.pem edge.key
)
if [ "$print" = 1 ]; then
  printf '%s\n' "$manifests"
else
  printf '%s\n' "$manifests" | kubectl apply -f -
fi
