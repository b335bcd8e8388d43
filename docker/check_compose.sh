#!/usr/bin/env bash
# Validates docker-compose.yml (GPU host) and docker-compose.yml + docker-compose.cpu.yml (CPU
# host) with Compose v2 itself: `docker compose config`, which resolves the merge (`!reset`),
# interpolation and the Compose specification exactly as `docker compose up` would.
#
#   docker/check_compose.sh
#
# The files need Compose 2.24.4 or newer (`!reset`). Where `docker compose` is missing or older
# (Debian bookworm ships only Compose v1.29.2, which rejects them), this fetches Debian trixie's
# `docker-compose` package (Compose v2, a Go binary that runs on bookworm) with apt itself, so its
# signature is checked against Debian's archive keyring, unpacks it into a temporary folder and
# makes it the Docker CLI's compose plugin there (DOCKER_CONFIG), so that `docker compose` itself
# runs: nothing is installed. Needs apt and Debian's mirror.
#
# Environment: DEBIAN_MIRROR [apt's own], COMPOSE [a Compose v2 command to use instead]
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
log() { printf '[check_compose] %s\n' "$*"; }

compose_ok() {  # command... : a Compose v2.24.4 or newer?
  local version
  version=$("$@" version --short 2>/dev/null) || return 1
  version=${version#v}
  [[ $(printf '%s\n2.24.4\n' "$version" | sort -V | head -n 1) == 2.24.4 ]]
}

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
if [[ -n ${COMPOSE:-} ]]; then
  read -r -a compose <<<"$COMPOSE"
elif compose_ok docker compose; then
  compose=(docker compose)
else
  mirror=${DEBIAN_MIRROR:-$(sed -n 's/^URIs: *//p' /etc/apt/sources.list.d/debian.sources 2>/dev/null | head -n 1)}
  mirror=${mirror:-http://deb.debian.org/debian}
  log "no Compose >= 2.24.4 here: fetching Debian trixie's docker-compose from $mirror with apt"
  mkdir -p "$work/apt/lists/partial" "$work/apt/cache/archives/partial" "$work/deb"
  printf 'deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] %s trixie main\n' "$mirror" \
    >"$work/trixie.list"
  apt_options=(-o Dir::Etc::SourceList="$work/trixie.list" -o Dir::Etc::SourceParts=/dev/null
    -o Dir::State::Lists="$work/apt/lists" -o Dir::Cache="$work/apt/cache" -o APT::Architecture=amd64)
  # (apt warns that its _apt user cannot write the temporary folder and downloads as root.)
  apt-get "${apt_options[@]}" -qq update 2> >(grep -v 'unsandboxed as root' >&2)
  (cd "$work/deb" && apt-get "${apt_options[@]}" -qq download docker-compose 2> >(grep -v 'unsandboxed as root' >&2))
  dpkg-deb -x "$work"/deb/docker-compose_*.deb "$work/root"
  plugin=$work/root/usr/libexec/docker/cli-plugins/docker-compose
  [[ -x $plugin ]] || { log "FAIL: the package holds no compose plugin"; exit 1; }
  mkdir -p "$work/config/cli-plugins"
  cp "$plugin" "$work/config/cli-plugins/"
  export DOCKER_CONFIG=$work/config
  compose=(docker compose)
  compose_ok "${compose[@]}" || compose=("$plugin")  # a docker CLI too old for plugins: run it alone
fi
compose_ok "${compose[@]}" || { log "FAIL: ${compose[*]} is not Compose >= 2.24.4"; exit 1; }
log "$("${compose[@]}" version)"

cd "$repo"
"${compose[@]}" -f docker-compose.yml config -q
log "docker-compose.yml: valid"
merged=$("${compose[@]}" -f docker-compose.yml -f docker-compose.cpu.yml config)
if grep -q 'capabilities:\|CUDA_ARCHS' <<<"$merged"; then
  log "FAIL: the CPU override keeps the GPU reservation or the CUDA build arguments"
  exit 1
fi
log "docker-compose.yml + docker-compose.cpu.yml: valid, no GPU reservation, no CUDA build arguments"
# The check must be able to fail: a misspelt key is refused.
sed 's/capabilities: \[gpu\]/capabilites: [gpu]/' docker-compose.yml >"$work/misspelt.yml"
if "${compose[@]}" -f "$work/misspelt.yml" --project-directory "$repo" config -q 2>/dev/null; then
  log "FAIL: a misspelt 'capabilites' was accepted"
  exit 1
fi
log "a misspelt 'capabilites' is refused"
