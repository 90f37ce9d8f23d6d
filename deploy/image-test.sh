#!/usr/bin/env bash
# Builds Dockerfile.cpu and checks the image as a user would run it: as the non-root user it
# declares, it serves every example model, answers curl, takes a Model manifest over REST, and
# stops cleanly on SIGTERM. For developers (it takes minutes); CI does not run it.
#   deploy/image-test.sh                  # base: python:3.11-slim, pulled
#   BASE_IMAGE=localhost/debian-python:bookworm deploy/image-test.sh   # no registry: deploy/base-image.sh first
# Needs podman (with runc, as root here: podman --runtime runc), curl.
set -euo pipefail
cd "$(dirname "$0")/.."
base=${BASE_IMAGE:-python:3.11-slim}
image=${IMAGE:-localhost/fleetserve:cpu}
port=${PORT:-18080}
podman=(podman --runtime runc)
limits=(--ulimit nofile=20000:20000 --ulimit nproc=4096:4096)  # runc here needs them explicit
build=("${podman[@]}" build -f Dockerfile.cpu --build-arg "BASE_IMAGE=$base" -t "$image")
# Wheels on this machine's disk (the CPU torch) are offered to pip inside the build, in place of
# PyTorch's own index.
if [ -d /opt/wheels ]; then
    build+=(--volume /opt/wheels:/wheels:ro --build-arg PIP_FIND_LINKS=/wheels --build-arg PIP_EXTRA_INDEX_URL=)
fi
# A machine whose HTTPS goes through a proxy with its own CA gives pip that CA (PIP_CERT) in the build too.
if [ -n "${PIP_CERT:-}" ]; then build+=(--volume "$PIP_CERT:/etc/pip-ca.crt:ro" --build-arg PIP_CERT=/etc/pip-ca.crt); fi
"${build[@]}" .

name=fleetserve-image-test
"${podman[@]}" rm -f "$name" >/dev/null 2>&1 || true
"${podman[@]}" run -d --name "$name" "${limits[@]}" -p "127.0.0.1:$port:8080" "$image" >/dev/null
trap '"${podman[@]}" rm -f "$name" >/dev/null 2>&1 || true' EXIT
url="http://127.0.0.1:$port"
for _ in $(seq 120); do
    curl -sf "$url/v2/health/ready" >/dev/null && break
    sleep 1
done
curl -sf "$url/v2/health/ready" >/dev/null || { "${podman[@]}" logs "$name"; echo "not ready"; exit 1; }

user=$("${podman[@]}" exec "$name" id -u)
[ "$user" = 10001 ] || { echo "runs as uid $user, not the image's 10001"; exit 1; }
# Every example model loaded (a runtime whose native library the image lacks fails here).
index=$(curl -sf -X POST "$url/v2/repository/index")
expected=$(find model_repo -mindepth 2 -maxdepth 2 -name model-settings.json | wc -l)
ready=$(echo "$index" | grep -o '"state":"READY"' | wc -l || true)
[ "$ready" = "$expected" ] || { echo "$ready of $expected example models ready: $index"; exit 1; }
body='{"inputs": [{"name": "input-0", "datatype": "FP32", "shape": [2, 4], "data": [[5.1, 3.5, 1.4, 0.2], [6.7, 3.0, 5.2, 2.3]]}]}'
answer=$(curl -sf "$url/v2/models/iris/infer" -H 'Content-Type: application/json' -d "$body")
echo "iris: $answer"
echo "$answer" | grep -q '"data":\[0,2\]' || { echo "unexpected answer"; exit 1; }
manifest='{"apiVersion": "mlops.seldon.io/v1alpha1", "kind": "Model", "metadata": {"name": "iris-again"},
           "spec": {"storageUri": "/models/iris", "requirements": ["sklearn"]}}'
curl -sf "$url/v2/manifests" -d "$manifest" | grep -q '"iris-again"' || { echo "the manifest was refused"; exit 1; }
curl -sf "$url/v2/models/iris-again/infer" -H 'Content-Type: application/json' -d "$body" | grep -q '"data":\[0,2\]'

"${podman[@]}" stop -t 40 "$name" >/dev/null  # SIGTERM, then the grace
code=$("${podman[@]}" inspect -f '{{.State.ExitCode}}' "$name")
"${podman[@]}" logs "$name" 2>&1 | tail -3
[ "$code" = 0 ] || { echo "exited with $code after SIGTERM"; exit 1; }
echo "image $image: ready as uid 10001 with all $expected example models, answered curl and a manifest, stopped cleanly on SIGTERM"
