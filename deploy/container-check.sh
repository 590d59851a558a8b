#!/usr/bin/env bash
# Build the CPU image with podman and check it: it serves an exported model mounted read-only,
# answers /rerank, reports healthy, and drains on `podman stop` (exit 0, drain in the logs).
# Prints the image size and the startup time (container start -> /ready 200).
#
# RUN BY HAND, not in CI: it needs root, podman/buildah/runc, debootstrap, network access to the
# Debian mirror and PyPI, and several minutes. Setup (Debian 12), once:
#   apt-get update && apt-get install -y podman buildah runc debootstrap curl
#   .venv/bin/encapure export ../shared/models/minilm-l6-wikiqa-reranker -o /tmp/rr-int8
# then: deploy/container-check.sh [EXPORTED_MODEL_DIR]     (default /tmp/rr-int8)
#
# No registry is reachable on our machines, so the base image is a local Debian bookworm rootfs
# with python3 (debootstrap), imported as localhost/debian-py:bookworm and passed as BASE; with a
# registry, `docker build .` uses the default python:3.11-slim-bookworm. Recipe: shared/tools/containers.md.
set -euo pipefail

MODEL_DIR=${1:-/tmp/rr-int8}
IMAGE=${IMAGE:-localhost/encapure:cpu}
BASE_IMAGE=${BASE_IMAGE:-localhost/debian-py:bookworm}
PORT=${PORT:-18080}
NAME=encapure-check-$$
cd "$(dirname "$0")/.."

[ "$(id -u)" = 0 ] || { echo "run as root (podman with runc, debootstrap)" >&2; exit 2; }
[ -f "$MODEL_DIR/encapure.json" ] || { echo "no exported model in $MODEL_DIR (run encapure export first)" >&2; exit 2; }
PODMAN=(podman --runtime runc)

# The sandbox may not raise rlimits: no default ulimits (containers.md).
if [ ! -f /etc/containers/containers.conf ]; then
    mkdir -p /etc/containers && printf '[containers]\ndefault_ulimits = []\n' > /etc/containers/containers.conf
fi

if ! podman image exists "$BASE_IMAGE"; then
    echo "== building the base image $BASE_IMAGE (debootstrap)"
    rootfs=$(mktemp -d)
    debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates bookworm "$rootfs" \
        http://deb.debian.org/debian
    tar -C "$rootfs" -c . | podman import - "$BASE_IMAGE"
    rm -rf "$rootfs"
fi

echo "== building $IMAGE"
t0=$(date +%s)
# --format docker keeps HEALTHCHECK (OCI drops it); the host's CA bundle lets pip verify PyPI.
"${PODMAN[@]}" build --format docker --network host -v /etc/ssl/certs:/etc/ssl/certs:ro \
    --build-arg BASE="$BASE_IMAGE" -t "$IMAGE" .
echo "build: $(( $(date +%s) - t0 )) s"
echo "image size: $(podman image inspect "$IMAGE" --format '{{.Size}}' | awk '{printf "%.0f MB", $1/1e6}')" \
     "(base $(podman image inspect "$BASE_IMAGE" --format '{{.Size}}' | awk '{printf "%.0f MB", $1/1e6}'))"
if "${PODMAN[@]}" run --rm --entrypoint python "$IMAGE" -c "import torch" 2>/dev/null; then
    echo "FAIL: torch is in the runtime image" >&2; exit 1
fi
user=$("${PODMAN[@]}" run --rm --entrypoint id "$IMAGE" -u 2>/dev/null)
[ "$user" = 10001 ] || { echo "FAIL: the image runs as uid $user, not 10001" >&2; exit 1; }

echo "== running it on $MODEL_DIR (mounted read-only)"
start=$(date +%s.%N)
"${PODMAN[@]}" run -d --name "$NAME" -p 127.0.0.1:$PORT:8000 -v "$MODEL_DIR":/models/model:ro \
    -e ENCAPURE_WORKERS=1 "$IMAGE" >/dev/null
trap '"${PODMAN[@]}" rm -f "$NAME" >/dev/null 2>&1 || true' EXIT
until curl -sf "http://127.0.0.1:$PORT/ready" >/dev/null; do
    if [ "$(podman inspect "$NAME" --format '{{.State.Running}}')" != true ]; then
        podman logs "$NAME"; echo "FAIL: the container exited" >&2; exit 1
    fi
    sleep 0.1
done
echo "startup: $(echo "$(date +%s.%N) - $start" | bc) s (container start -> /ready 200)"
body='{"query": "What is the capital of France?", "documents": ["Berlin is in Germany.", "Paris is the capital of France."]}'
answer=$(curl -sf "http://127.0.0.1:$PORT/rerank" -H 'Content-Type: application/json' -d "$body")
echo "/rerank: $answer"
echo "$answer" | python3 -c 'import json,sys; r=json.load(sys.stdin)["results"]; assert r[0]["index"]==1, r'
"${PODMAN[@]}" healthcheck run "$NAME" && echo "healthcheck: healthy"
echo "RSS after a request: $(podman stats --no-stream --format '{{.MemUsage}}' "$NAME")"

echo "== podman stop with requests in flight"
python3 -c 'import json; print(json.dumps({"query": "q", "documents": ["a long passage " * 60] * 32}))' > "/tmp/$NAME.body"
pids=()
for i in 1 2 3 4; do
    curl -s -o /dev/null -w '%{http_code}\n' "http://127.0.0.1:$PORT/rerank" \
        -H 'Content-Type: application/json' -d @"/tmp/$NAME.body" > "/tmp/$NAME.code$i" &
    pids+=($!)
done
sleep 0.5
"${PODMAN[@]}" stop -t 40 "$NAME" >/dev/null
for p in "${pids[@]}"; do wait "$p" || true; done
codes=$(cat /tmp/$NAME.code* | sort | uniq -c | tr '\n' ' '); rm -f /tmp/$NAME.*
echo "in-flight requests answered: $codes"
code=$(podman inspect "$NAME" --format '{{.State.ExitCode}}')
podman logs "$NAME" 2>&1 | grep -E 'received|drain|stopped' || true
[ "$code" = 0 ] || { echo "FAIL: exit status $code after podman stop" >&2; exit 1; }
podman logs "$NAME" 2>&1 | grep -q 'drained' || { echo "FAIL: no drain in the logs" >&2; exit 1; }
echo "$codes" | grep -Eq '^ *4 200 *$' || { echo "FAIL: an in-flight request was not answered 200" >&2; exit 1; }
echo "OK: exit status 0 after draining"
