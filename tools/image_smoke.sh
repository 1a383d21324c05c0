#!/usr/bin/env bash
# Build the CPU image and run it, with no Docker engine and no registry (`make image-smoke`, as root):
#   1. a Debian bookworm base made with debootstrap and `podman import` (nothing is pulled);
#   2. `buildah bud --isolation chroot --target cpu` (and `cpu-train`), with the host CA bundle and the
#      machine's pip sources (its local wheel folder, its index URLs) for pip;
#   3. an init run of the trainer image that builds the tiny model and a random adapter into volumes, then the server
#      (`--runtime runc`, lowered ulimits) on 127.0.0.1, checked with /health and one chat request.
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" = 0 ] || { echo "image-smoke: run as root (podman/buildah with chroot isolation)"; exit 1; }
started=$(date +%s)
WORK=${VLORA_SMOKE_DIR:-/var/tmp/vlora-smoke}
BASE=localhost/vlora-base:bookworm
IMAGE=localhost/vlora:cpu-smoke
TRAIN_IMAGE=localhost/vlora-train:cpu-smoke
PORT=${VLORA_SMOKE_PORT:-18080}
# The Debian archive this machine's apt is configured with (deb822 sources first, then sources.list).
machine_mirror() {
  awk '/^URIs:/ {print $2; exit}' /etc/apt/sources.list.d/*.sources 2>/dev/null | grep . \
    || awk '$1 == "deb" {print $2; exit}' /etc/apt/sources.list 2>/dev/null
}
MIRROR=${DEBIAN_MIRROR:-$(machine_mirror)}
[ -n "$MIRROR" ] || { echo "image-smoke: no apt source configured on this machine; set DEBIAN_MIRROR"; exit 1; }
mkdir -p "$WORK"

need=()
for tool in podman buildah debootstrap runc; do command -v "$tool" >/dev/null || need+=("$tool"); done
if [ ${#need[@]} -gt 0 ]; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" uidmap >/dev/null
fi
PODMAN=(podman --cgroup-manager cgroupfs --events-backend file)

if ! "${PODMAN[@]}" image exists "$BASE"; then
  echo "== base image (debootstrap bookworm)"
  rm -rf "$WORK/rootfs"
  debootstrap --variant=minbase --include=python3,python3-venv,python3-pip,ca-certificates,libgomp1,tini \
    bookworm "$WORK/rootfs" "$MIRROR" >"$WORK/debootstrap.log" 2>&1 || { tail -20 "$WORK/debootstrap.log"; exit 1; }
  tar -C "$WORK/rootfs" -c . | "${PODMAN[@]}" import - "$BASE" >/dev/null
  rm -rf "$WORK/rootfs"
fi
echo "base ready after $(( $(date +%s) - started ))s"

echo "== build (targets cpu, cpu-train)"
# pip inside the build uses this machine's package sources: its local wheel folder if it has one, and the
# index URLs of its environment (PIP_INDEX_URL / PIP_EXTRA_INDEX_URL), so torch's CPU wheel comes from there.
mounts=(-v /etc/ssl/certs/ca-certificates.crt:/etc/ssl/certs/ca-certificates.crt:ro)
pip_args=""
if [ -d /opt/wheels ]; then
  mounts+=(-v /opt/wheels:/opt/wheels:ro)
  pip_args="--find-links /opt/wheels"
fi
for var in PIP_INDEX_URL PIP_EXTRA_INDEX_URL; do
  [ -z "${!var:-}" ] || mounts+=(--env "$var=${!var}")
done
build() {  # TARGET TAG
  buildah --storage-driver "$(podman info --format '{{.Store.GraphDriverName}}')" bud --isolation chroot --format docker \
    --layers --target "$1" --build-arg "PYTHON_IMAGE=$BASE" --build-arg "PIP_ARGS=$pip_args" \
    --env PIP_CERT=/etc/ssl/certs/ca-certificates.crt "${mounts[@]}" -t "$2" . >>"$WORK/build.log" 2>&1 \
    || { tail -40 "$WORK/build.log"; exit 1; }
}
: >"$WORK/build.log"
build cpu "$IMAGE"             # the serving image: no trainer in it
build cpu-train "$TRAIN_IMAGE"  # the trainer image, for the demo assets (as the cpu-demo overlay does)
echo "image built after $(( $(date +%s) - started ))s"

# vLLM's engine processes talk through /dev/shm (160 MiB rings): give it room, as the k8s emptyDir does.
run=("${PODMAN[@]}" run --runtime runc --network host --shm-size 1g --ulimit nofile=4096:4096
     --ulimit nproc=4096:4096 --no-healthcheck -v vlora-smoke-models:/models -v vlora-smoke-adapters:/adapters)
echo "== demo assets (tiny model, random adapters)"
"${run[@]}" --rm --entrypoint /bin/sh "$TRAIN_IMAGE" -c \
  'test -f /models/tiny-qwen3-vl/config.json || vlora-train tiny-model --out /models/tiny-qwen3-vl;
   test -f /adapters/demo-a/adapter_config.json || vlora-train random-adapter --base /models/tiny-qwen3-vl --out /adapters/demo-a --seed 1' \
  >"$WORK/assets.log" 2>&1 || { tail -30 "$WORK/assets.log"; exit 1; }

echo "== serve"
"${PODMAN[@]}" rm -f vlora-smoke >/dev/null 2>&1 || true
"${run[@]}" -d --name vlora-smoke -e VLORA_HOST=127.0.0.1 -e "VLORA_PORT=$PORT" "$IMAGE" >/dev/null
cleanup() { "${PODMAN[@]}" logs vlora-smoke >"$WORK/server.log" 2>&1 || true; "${PODMAN[@]}" rm -f vlora-smoke >/dev/null 2>&1 || true; }
trap cleanup EXIT
for _ in $(seq 1 120); do
  curl -fsS "http://127.0.0.1:$PORT/ready" >/dev/null 2>&1 && break
  [ "$("${PODMAN[@]}" inspect -f '{{.State.Running}}' vlora-smoke)" = true ] || { "${PODMAN[@]}" logs vlora-smoke | tail -30; exit 1; }
  sleep 2
done
curl -fsS "http://127.0.0.1:$PORT/health"
echo
# A 32x32 red PNG, made with the standard library only.
body=$(python3 - <<'PY'
import base64, json, struct, zlib
def chunk(kind, data):
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
raw = b"".join(b"\x00" + b"\xff\x00\x00" * 32 for _ in range(32))
png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 32, 32, 8, 2, 0, 0, 0)) + \
    chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")
url = "data:image/png;base64," + base64.b64encode(png).decode()
print(json.dumps({"model": "demo-a", "max_tokens": 8, "messages": [{"role": "user", "content": [
    {"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "What color is the shape?"}]}]}))
PY
)
curl -fsS "http://127.0.0.1:$PORT/v1/chat/completions" -H 'Content-Type: application/json' -d "$body" \
  | python3 -c 'import json, sys; r = json.load(sys.stdin); print("chat ok:", r["usage"])'
echo "image smoke passed in $(( $(date +%s) - started ))s"
