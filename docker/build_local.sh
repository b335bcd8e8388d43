#!/usr/bin/env bash
# Builds docker/Dockerfile.cpu for real on a machine that reaches no image registry and no PyTorch
# index (only Debian's mirror and PyPI, possibly through a TLS-intercepting proxy), then runs the
# image and checks what a deployment relies on. Run as root from anywhere; it takes minutes.
#
#   docker/build_local.sh
#
# Steps: (1) a Debian bookworm base made with debootstrap and `docker import`; (2) a stand-in for
# python:3.11-slim-bookworm on it (Debian's Python 3.11 as `python`); (3) an image holding the
# torch wheel from this machine's disk; (4) docker/Dockerfile.cpu built with those as build
# arguments and the CA bundle as a BuildKit secret; (5) the container started with
# --network none until /readyz answers 200 (the models load offline); (6) started again on the
# host network: /readyz, a real photo through /v1/expressions, /metrics, the non-root user, the
# HEALTHCHECK turning healthy, and SIGTERM exiting 0 within the drain timeout.
#
# Environment (defaults in brackets):
#   DOCKER [docker]                   the Docker client
#   START_DOCKERD [1]                 start `dockerd --storage-driver=vfs` if no engine answers, and
#                                     stop it at the end
#   WORK [/var/tmp/fermam-build]      debootstrap root, wheel copy, compat Dockerfile, logs
#   DEBIAN_MIRROR [apt's own]         mirror for debootstrap
#   CA_BUNDLE [/etc/ssl/certs/ca-certificates.crt]  PEM bundle pip trusts inside the build
#   TORCH_VERSION [2.13.0]            found by the host's pip (its find-links or index)
#   PHOTO [first .jpg in /work/shared/data/photos]  the photo sent to /v1/expressions
#   PORT [18615]                      loopback port of the host-network run
#   IMAGE [fermam-service:cpu-local]  tag of the built image
#   CLEAN [0]                         1: remove containers and images at the end (system prune)
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
docker=${DOCKER:-docker}
work=${WORK:-/var/tmp/fermam-build}
ca_bundle=${CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}
torch_version=${TORCH_VERSION:-2.13.0}
port=${PORT:-18615}
image=${IMAGE:-fermam-service:cpu-local}
debian_base=fermam-local/debian:bookworm
python_base=fermam-local/python:3.11-slim-bookworm
wheels_image=fermam-local/torch-wheels:$torch_version
drain_s=10
export DOCKER_BUILDKIT=1
mkdir -p "$work"
log() { printf '[build_local %s] %s\n' "$(date -u +%H:%M:%S)" "$*"; }
fail() { log "FAIL: $*" >&2; exit 1; }  # stderr: also seen from inside $(...)

dockerd_pid=
cleanup() {
  "$docker" rm -f fermam-offline fermam-host >/dev/null 2>&1 || true
  if [[ ${CLEAN:-0} == 1 ]]; then "$docker" system prune -af >/dev/null 2>&1 || true; fi
  if [[ -n $dockerd_pid ]]; then
    log "stopping the dockerd this script started (pid $dockerd_pid)"
    kill "$dockerd_pid" 2>/dev/null || true
    wait "$dockerd_pid" 2>/dev/null || true
  fi
}
trap cleanup EXIT

# -- the engine ----------------------------------------------------------------------------------
if ! "$docker" info >/dev/null 2>&1; then
  [[ ${START_DOCKERD:-1} == 1 ]] || fail "no Docker engine answers"
  log "starting dockerd --storage-driver=vfs (log: $work/dockerd.log)"
  dockerd --storage-driver=vfs >"$work/dockerd.log" 2>&1 &
  dockerd_pid=$!
  for _ in $(seq 60); do "$docker" info >/dev/null 2>&1 && break; sleep 1; done
  "$docker" info >/dev/null 2>&1 || fail "dockerd did not start: $(tail -n 5 "$work/dockerd.log")"
fi
server_version=$("$docker" version --format '{{.Server.Version}}')
log "Docker engine $server_version"

# Docker before 23 (Debian bookworm's docker.io is 20.10) builds with BuildKit's built-in
# Dockerfile frontend of its time, which has no `RUN --network`, and cannot pull the frontend the
# `# syntax=` line names without a registry. Then a copy without both is built; the offline check
# that `RUN --network=none` makes at build time is made by step 5 instead.
dockerfile=$repo/docker/Dockerfile.cpu
if (( ${server_version%%.*} < 23 )); then
  dockerfile=$work/Dockerfile.cpu.engine${server_version%%.*}
  sed -e '/^# syntax=/d' -e 's/^RUN --network=none /RUN /' "$repo/docker/Dockerfile.cpu" >"$dockerfile"
  log "engine < 23: building $dockerfile (docker/Dockerfile.cpu without '# syntax=' and 'RUN --network=none')"
fi

# -- (1) (2) (3) local bases ---------------------------------------------------------------------
if ! "$docker" image inspect "$debian_base" >/dev/null 2>&1; then
  mirror=${DEBIAN_MIRROR:-$(sed -n 's/^URIs: *//p' /etc/apt/sources.list.d/debian.sources 2>/dev/null | head -n 1)}
  mirror=${mirror:-http://deb.debian.org/debian}
  log "debootstrap bookworm from $mirror"
  start=$SECONDS
  rm -rf "$work/rootfs"
  debootstrap --variant=minbase bookworm "$work/rootfs" "$mirror" >"$work/debootstrap.log" 2>&1 \
    || fail "debootstrap: $(tail -n 3 "$work/debootstrap.log")"
  tar -C "$work/rootfs" -c . | "$docker" import - "$debian_base" >/dev/null
  rm -rf "$work/rootfs"
  log "$debian_base made in $((SECONDS - start)) s"
fi
log "building $python_base"
"$docker" build --network host -q -t "$python_base" - >/dev/null <<EOF
FROM $debian_base
RUN apt-get update \\
 && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \\
 && rm -rf /var/lib/apt/lists/* \\
 && ln -s /usr/bin/python3 /usr/local/bin/python
EOF

rm -rf "$work/wheels" && mkdir -p "$work/wheels"
python3 -m pip download --quiet --no-deps --only-binary :all: --dest "$work/wheels" "torch==$torch_version" \
  || fail "the host's pip finds no torch $torch_version wheel"
log "torch wheel: $(ls "$work/wheels")"
printf 'FROM scratch\nCOPY *.whl /\n' | "$docker" build -q -t "$wheels_image" -f - "$work/wheels" >/dev/null

# -- (4) the image -------------------------------------------------------------------------------
log "building $image from docker/Dockerfile.cpu (log: $work/build.log)"
start=$SECONDS
"$docker" build --network host --progress plain \
  -f "$dockerfile" -t "$image" \
  --build-arg BASE_IMAGE="$python_base" \
  --build-arg TORCH_WHEELS="$wheels_image" \
  --build-arg TORCH_INDEX= \
  --secret id=ca_bundle,src="$ca_bundle" \
  "$repo" >"$work/build.log" 2>&1 || fail "docker build: $(tail -n 20 "$work/build.log")"
build_s=$((SECONDS - start))
size=$("$docker" image inspect --format '{{.Size}}' "$image")
log "built in $build_s s; image size $((size / 1000000)) MB ($size bytes)"
"$docker" run --rm --entrypoint sh "$image" -c 'test ! -e /run/secrets/ca_bundle' || fail "CA bundle left in the image"

wait_ready() {  # container, seconds: until healthcheck.py /readyz passes inside it
  local name=$1 limit=$2 t0=$SECONDS
  while (( SECONDS - t0 < limit )); do
    [[ $("$docker" inspect -f '{{.State.Running}}' "$name") == true ]] \
      || fail "$name exited: $("$docker" logs --tail 20 "$name" 2>&1)"
    "$docker" exec "$name" python /opt/fermam/healthcheck.py /readyz 2>/dev/null && { echo $((SECONDS - t0)); return 0; }
    sleep 2
  done
  fail "$name not ready after $limit s: $("$docker" logs --tail 20 "$name" 2>&1)"
}

# -- (5) no network ------------------------------------------------------------------------------
log "run with --network none"
"$docker" run -d --name fermam-offline --network none "$image" >/dev/null
ready_s=$(wait_ready fermam-offline 300)
log "offline: /readyz 200 after $ready_s s with no network (models loaded from the image)"
"$docker" rm -f fermam-offline >/dev/null

# -- (6) host network ----------------------------------------------------------------------------
photo=${PHOTO:-$(ls /work/shared/data/photos/*.jpg | head -n 1)}
log "run on the host network, port $port (loopback only), drain timeout $drain_s s"
"$docker" run -d --name fermam-host --network host \
  -e FERMAM_HOST=127.0.0.1 -e FERMAM_PORT="$port" -e FERMAM_DRAIN_TIMEOUT_S="$drain_s" \
  -e FERMAM_TORCH_THREADS=2 "$image" >/dev/null
ready_s=$(wait_ready fermam-host 300)
base=http://127.0.0.1:$port
log "/readyz: $(curl -sS "$base/readyz") after $ready_s s"

# The photo is sent from the host (multipart), never copied into the image or the repository.
code=$(curl -sS -o "$work/expressions.json" -w '%{http_code}' -F "files=@$photo" "$base/v1/expressions")
[[ $code == 200 ]] || fail "/v1/expressions answered $code: $(cat "$work/expressions.json")"
python3 - "$work/expressions.json" "$photo" <<'PY' || fail "unexpected /v1/expressions answer"
import json, sys
answer = json.load(open(sys.argv[1]))
faces = [face for image in answer["images"] for face in image["faces"]]
assert faces, answer
top = [face["expression"] for face in faces]
assert all(abs(sum(face["scores"].values()) - 1) < 1e-3 for face in faces), faces
print(f"[build_local] /v1/expressions: {sys.argv[2].rsplit('/', 1)[-1]}: {len(faces)} face(s), top expressions {top}")
PY
metrics=$(curl -sS "$base/metrics")
grep -q '^fermam_requests_total' <<<"$metrics" || fail "/metrics has no fermam_requests_total"
log "/metrics: $(grep -c '^fermam_' <<<"$metrics") fermam_* samples"

uid=$("$docker" exec fermam-host id -u)
user=$("$docker" image inspect --format '{{.Config.User}}' "$image")
[[ $uid != 0 && $user == fermam ]] || fail "runs as uid $uid (image user '$user')"
log "user: $user (uid $uid)"

t0=$SECONDS
until [[ $("$docker" inspect -f '{{.State.Health.Status}}' fermam-host) == healthy ]]; do
  (( SECONDS - t0 < 120 )) || fail "HEALTHCHECK not healthy: $("$docker" inspect -f '{{json .State.Health}}' fermam-host)"
  sleep 2
done
log "HEALTHCHECK: healthy ($((SECONDS - t0)) s after the service was ready)"

start=$(date +%s.%N)
"$docker" kill --signal TERM fermam-host >/dev/null
"$docker" wait fermam-host >/dev/null
stop_s=$(python3 -c "import sys; print(f'{float(sys.argv[2]) - float(sys.argv[1]):.1f}')" "$start" "$(date +%s.%N)")
exit_code=$("$docker" inspect -f '{{.State.ExitCode}}' fermam-host)
[[ $exit_code == 0 ]] || fail "SIGTERM: exit code $exit_code: $("$docker" logs --tail 20 fermam-host 2>&1)"
python3 -c "import sys; sys.exit(float(sys.argv[1]) > float(sys.argv[2]))" "$stop_s" "$drain_s" \
  || fail "SIGTERM: exited after $stop_s s, more than the $drain_s s drain timeout"
log "SIGTERM: exit code 0 after $stop_s s (drain timeout $drain_s s)"
log "OK: image $image, $((size / 1000000)) MB, built in $build_s s"
