#!/usr/bin/env bash
# flox-node-cache on a local kind cluster: create the cluster, build and load the
# image, install the DaemonSet, prewarm two public Flox environments and look
# at the result from the node's side.
#
# Needs: docker, kind, kubectl, and internet access (FloxHub, cache.nixos.org,
# cache.flox.dev). Run from anywhere:   daemonset/kind/walkthrough.sh
# Clean up:                             kind delete cluster --name flox-node-cache
#
# kind nodes have no Flox containerd shim, so Flox pods themselves do not start
# here; everything the agent does (cache, prewarm, status, metrics) does.
set -euo pipefail

CLUSTER="${CLUSTER:-flox-node-cache}"
IMAGE="${IMAGE:-ghcr.io/flox/flox-node-cache:0.1.0}"
TIMEOUT="${TIMEOUT:-600}"   # seconds to wait for the prewarm
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
CTX="kind-$CLUSTER"

step() { printf '\n\033[1m==> %s\033[0m\n' "$*"; }
kc() { kubectl --context "$CTX" "$@"; }

for tool in docker kind kubectl; do
  command -v "$tool" >/dev/null || { echo "missing: $tool" >&2; exit 1; }
done

step "1. Create the kind cluster '$CLUSTER' (one control plane, one worker)"
if kind get clusters | grep -qx "$CLUSTER"; then
  echo "cluster exists, reusing it"
else
  kind create cluster --name "$CLUSTER" --wait 120s --config - <<'KIND'
kind: Cluster
apiVersion: kind.x-k8s.io/v1alpha4
nodes:
  - role: control-plane
  - role: worker
KIND
fi
WORKER="$(kc get nodes -l '!node-role.kubernetes.io/control-plane' \
  -o jsonpath='{.items[0].metadata.name}')"

step "2. Mark $WORKER as a Flox node (the DaemonSet's nodeSelector) in pool 'web'"
kc label node "$WORKER" flox.dev/enabled=true node-pool=web --overwrite

step "3. Build the image and load it into the kind nodes"
docker build -f "$REPO_ROOT/daemonset/Dockerfile" -t "$IMAGE" "$REPO_ROOT"
kind load docker-image "$IMAGE" --name "$CLUSTER"

step "4. Install: namespace, CRD, RBAC, DaemonSet, metrics Service"
kc apply -k "$REPO_ROOT/daemonset/base"
kc wait --for=condition=Established crd/environmentprewarms.nodecache.flox.dev --timeout=60s
kc -n flox-node-cache rollout status daemonset/flox-node-cache --timeout=300s
kc -n flox-node-cache get pods -o wide

step "5. Prewarm flox/quotes-app and flox/redis on the 'web' pool"
kc apply -f "$REPO_ROOT/daemonset/examples/environmentprewarm.yaml"

step "6. Wait until the agent on $WORKER reports Ready (or Failed)"
phase=""
deadline=$((SECONDS + TIMEOUT))
while (( SECONDS < deadline )); do
  phase="$(kc get envprewarm web-apps \
    -o jsonpath="{.status.nodes['$WORKER'].phase}" 2>/dev/null || true)"
  done_paths="$(kc get envprewarm web-apps \
    -o jsonpath="{.status.nodes['$WORKER'].pathsDone}/{.status.nodes['$WORKER'].pathsTotal}" \
    2>/dev/null || true)"
  echo "$(date +%T) phase=${phase:-<none>} paths=${done_paths:-?}"
  [[ "$phase" == Ready || "$phase" == Failed ]] && break
  sleep 10
done
kc get envprewarm web-apps -o yaml

step "7. Look from the node: the loopback cache, metrics and the admin socket"
# The node's nix-daemon would use http://127.0.0.1:37515 as a substituter.
docker exec "$WORKER" curl -fsS http://127.0.0.1:37515/nix-cache-info
docker exec "$WORKER" curl -fsS http://127.0.0.1:37516/metrics | grep -E '^flox_node_cache_' | head -20
# The admin socket (also speaks the cache protocol) that Flox pods may mount.
docker exec "$WORKER" curl -fsS --unix-socket /run/flox-node-cache/agent.sock \
  http://agent/nix-cache-info
docker exec "$WORKER" curl -sS --unix-socket /run/flox-node-cache/agent.sock \
  http://agent/v1/status || true
echo
docker exec "$WORKER" du -sh /var/lib/flox-node-cache

if [[ "$phase" != Ready ]]; then
  echo "prewarm did not reach Ready (phase: ${phase:-none}); agent logs:" >&2
  kc -n flox-node-cache logs daemonset/flox-node-cache --tail=50 >&2
  exit 1
fi
step "Done. Remove the cluster with: kind delete cluster --name $CLUSTER"
