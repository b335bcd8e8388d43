#!/usr/bin/env bash
# Builds docker/Dockerfile.cpu (or, with `cuda`, docker/Dockerfile) for real on a machine that
# reaches no image registry and no PyTorch index (only Debian's mirror and PyPI, possibly through
# a TLS-intercepting proxy), then runs the image and checks what a deployment relies on. Run as
# root from anywhere; it takes minutes (the CUDA image: about half an hour on 2 cores).
#
#   docker/build_local.sh [cpu|cuda]
#
# Steps: (1) a Debian bookworm base made with debootstrap and `docker import`; (2) a stand-in for
# python:3.11-slim-bookworm on it (Debian's Python 3.11 as `python`, with its headers as the
# official image has them); (3) an image holding the torch wheel from this machine's disk (for
# `cuda`: the CUDA torch wheel, every wheel it depends on, and nvcc's wheels); (4) the Dockerfile
# built with those as build arguments and the CA bundle as a BuildKit secret; (5) the container
# started with --network none until /readyz answers 200 (the models load offline), then the
# sample photo posted from inside it (one face); (6) started
# again on the host network: /readyz, a real photo through /v1/expressions, /metrics, the
# non-root user, the HEALTHCHECK turning healthy, and SIGTERM exiting 0 within the drain timeout.
# The CUDA image runs here with FERMAM_DEVICE=cpu (no GPU); (7) it also reports, from inside the
# image, whether mamba-ssm's compiled kernel imports and which GPU code it holds.
#
# Environment (defaults in brackets):
#   DOCKER [docker, or Debian's /usr/bin/docker when `docker` is a client without buildx]
#   START_DOCKERD [1]                 start `dockerd` if no engine answers, and stop it at the end
#   DOCKERD_STORAGE_DRIVER []         its storage driver (empty: dockerd's choice, overlay2 on ext4;
#                                     vfs works anywhere but copies every layer whole)
#   WORK [/var/tmp/fermam-build]      debootstrap root, wheel copy, compat Dockerfile, logs
#   DEBIAN_MIRROR [apt's own]         mirror for debootstrap
#   CA_BUNDLE [/etc/ssl/certs/ca-certificates.crt]  PEM bundle pip trusts inside the build
#   TORCH_VERSION [cpu: 2.13.0, cuda: 2.14.1]  found by the host's pip (its find-links or index)
#   CUDA_ARCHS [8.0 9.0+PTX]          cuda: the kernel's architectures (the Dockerfile's default is
#                                     "8.0 8.6 8.9 9.0+PTX": about twice the compile time)
#   MAX_JOBS [2]                      cuda: parallel nvcc jobs
#   FACE_WEIGHTS_DIR []               cuda: a folder holding face-alignment's two weight files;
#                                     without it the image is built with FACE_BACKEND=dlib (their
#                                     download host is not reachable from this project's machines)
#   PHOTO [first .jpg in /work/shared/data/photos]  the photo sent to /v1/expressions
#   PORT [18615]                      loopback port of the host-network run
#   IMAGE [fermam-service:VARIANT-local]  tag of the built image
#   CLEAN [0]                         1: remove containers and images at the end (system prune)
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
variant=${1:-cpu}
case $variant in
  cpu) source_dockerfile=$repo/docker/Dockerfile.cpu; torch_version=${TORCH_VERSION:-2.13.0} ;;
  cuda) source_dockerfile=$repo/docker/Dockerfile; torch_version=${TORCH_VERSION:-2.14.1} ;;
  *) echo "usage: build_local.sh [cpu|cuda]" >&2; exit 2 ;;
esac
# Docker's newer clients build only through buildx; Debian's 20.10 client still speaks BuildKit.
docker=${DOCKER:-docker}
if [[ -z ${DOCKER:-} ]] && ! docker buildx version >/dev/null 2>&1 && [[ -x /usr/bin/docker ]]; then
  docker=/usr/bin/docker
fi
work=${WORK:-/var/tmp/fermam-build}
ca_bundle=${CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}
port=${PORT:-18615}
image=${IMAGE:-fermam-service:$variant-local}
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
  storage=${DOCKERD_STORAGE_DRIVER:+--storage-driver=$DOCKERD_STORAGE_DRIVER}
  log "starting dockerd $storage (log: $work/dockerd.log)"
  dockerd $storage >"$work/dockerd.log" 2>&1 &
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
dockerfile=$source_dockerfile
if (( ${server_version%%.*} < 23 )); then
  dockerfile=$work/$(basename "$source_dockerfile").engine${server_version%%.*}
  sed -e '/^# syntax=/d' -e 's/^RUN --network=none /RUN /' "$source_dockerfile" >"$dockerfile"
  log "engine < 23: building $dockerfile (${source_dockerfile#"$repo"/} without '# syntax=' and 'RUN --network=none')"
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
 && apt-get install -y --no-install-recommends python3 python3-venv python3-dev ca-certificates \\
 && rm -rf /var/lib/apt/lists/* \\
 && ln -s /usr/bin/python3 /usr/local/bin/python
EOF

rm -rf "$work/wheels" && mkdir -p "$work/wheels"
build_args=()
run_env=()
if [[ $variant == cpu ]]; then
  python3 -m pip download --quiet --no-deps --only-binary :all: --dest "$work/wheels" "torch==$torch_version" \
    || fail "the host's pip finds no torch $torch_version wheel"
  log "torch wheel: $(ls "$work/wheels")"
else
  # The CUDA wheel with all it depends on (cuDNN, cuBLAS, NCCL, triton: about 3 GB), and nvcc's
  # wheels at the CUDA toolkit version it requires, so the build takes them from this image.
  python3 -m pip download --quiet --only-binary :all: --dest "$work/wheels" "torch==$torch_version" \
    2> >(grep -v '^WARNING: Location' >&2) || fail "the host's pip finds no torch $torch_version wheel"
  toolkit=$(unzip -p "$work"/wheels/torch-"$torch_version"-*.whl "torch-$torch_version.dist-info/METADATA" \
    | sed -n 's/^Requires-Dist: cuda-toolkit\[[^]]*\]\(==[0-9.]*\).*/\1/p')
  [[ -n $toolkit ]] || fail "torch $torch_version names no cuda-toolkit version (a CPU wheel?)"
  python3 -m pip download --quiet --only-binary :all: --dest "$work/wheels" "cuda-toolkit[nvcc,cccl]$toolkit" \
    2> >(grep -v '^WARNING: Location' >&2) || fail "no cuda-toolkit$toolkit wheels"
  log "CUDA torch $torch_version and its wheels (cuda-toolkit$toolkit): $(ls "$work/wheels" | wc -l) files, $(du -sh "$work/wheels" | cut -f1)"
  build_args+=(--build-arg TORCH_VERSION="$torch_version" --build-arg CUDA_ARCHS="${CUDA_ARCHS:-8.0 9.0+PTX}"
    --build-arg MAX_JOBS="${MAX_JOBS:-2}")
  run_env=(-e FERMAM_DEVICE=cpu)  # no GPU on this build machine
  if [[ -n ${FACE_WEIGHTS_DIR:-} ]]; then
    printf 'FROM scratch\nCOPY s3fd-*.pth 2DFAN4-*.pth.tar /\n' \
      | "$docker" build -q -t fermam-local/face-weights -f - "$FACE_WEIGHTS_DIR" >/dev/null
    build_args+=(--build-arg FACE_WEIGHTS=fermam-local/face-weights)
  else
    log "no FACE_WEIGHTS_DIR: building with FACE_BACKEND=dlib (face-alignment's weights are not fetched)"
    build_args+=(--build-arg FACE_BACKEND=dlib)
  fi
fi
printf 'FROM scratch\nCOPY *.whl /\n' | "$docker" build -q -t "$wheels_image" -f - "$work/wheels" >/dev/null

# -- (4) the image -------------------------------------------------------------------------------
build_log=$work/build-$variant.log
log "building $image from ${source_dockerfile#"$repo"/} (log: $build_log)"
start=$SECONDS
"$docker" build --network host --progress plain \
  -f "$dockerfile" -t "$image" \
  --build-arg BASE_IMAGE="$python_base" \
  --build-arg TORCH_WHEELS="$wheels_image" \
  --build-arg TORCH_INDEX= \
  "${build_args[@]}" \
  --secret id=ca_bundle,src="$ca_bundle" \
  "$repo" >"$build_log" 2>&1 || fail "docker build: $(tail -n 20 "$build_log")"
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
"$docker" run -d --name fermam-offline --network none "${run_env[@]}" "$image" >/dev/null
ready_s=$(wait_ready fermam-offline 300)
log "offline: /readyz 200 after $ready_s s with no network (models loaded from the image)"
# The sample photo the image holds, posted from inside the container (nothing reaches it from outside).
offline_answer=$("$docker" exec fermam-offline python -c '
import httpx
photo = open("/opt/fermam/grace_hopper.jpg", "rb").read()
answer = httpx.post("http://127.0.0.1:8000/v1/expressions", files={"files": ("grace_hopper.jpg", photo)}, timeout=120)
faces = answer.json()["images"][0]["faces"] if answer.status_code == 200 else None
assert faces and len(faces) == 1, (answer.status_code, answer.text[:300])
print("1 face,", faces[0]["expression"])
') || fail "offline: the sample photo was not answered: $offline_answer"
log "offline: grace_hopper.jpg through /v1/expressions inside the container: $offline_answer"
"$docker" rm -f fermam-offline >/dev/null

# -- (6) host network ----------------------------------------------------------------------------
photo=${PHOTO:-$(ls /work/shared/data/photos/*.jpg | head -n 1)}
log "run on the host network, port $port (loopback only), drain timeout $drain_s s"
"$docker" run -d --name fermam-host --network host "${run_env[@]}" \
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

# -- (7) the CUDA image's kernel -------------------------------------------------------------------
if [[ $variant == cuda ]]; then
  kernel_check='import torch, selective_scan_cuda, mamba_ssm
from model.scan import available_backends
print(f"torch {torch.__version__} (CUDA {torch.version.cuda}); {selective_scan_cuda.__file__} imports;"
      f" mamba_ssm {mamba_ssm.__version__}; scan backends {available_backends()};"
      f" CUDA usable here: {torch.cuda.is_available()}")'
  log "kernel: $("$docker" run --rm --network none "$image" python -c "$kernel_check" 2>&1 | tail -n 1)"
  "$docker" run --rm --network none --entrypoint sh "$image" \
    -c 'cat /opt/venv/lib/python3*/site-packages/selective_scan_cuda*.so' >"$work/selective_scan_cuda.so"
  log "kernel GPU code: $(python3 "$repo/docker/fatbin_archs.py" "$work/selective_scan_cuda.so")"
fi
log "OK: image $image, $((size / 1000000)) MB, built in $build_s s; the whole script took $SECONDS s"
