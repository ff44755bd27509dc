#!/usr/bin/env bash
# Make sure a Docker engine answers here: install Debian's docker.io, docker-compose (Compose 1.29),
# debootstrap and curl when missing, start dockerd when no engine answers, and wait for it.
# Needs root and apt (Debian/Ubuntu); a machine that already runs Docker needs neither.
# Used by `make test-container` and .ci/run; safe to run again (it changes nothing then).
set -euo pipefail

missing=()
command -v docker >/dev/null || missing+=(docker.io)
command -v dockerd >/dev/null || docker info >/dev/null 2>&1 || missing+=(docker.io)
command -v docker-compose >/dev/null || missing+=(docker-compose)
command -v debootstrap >/dev/null || missing+=(debootstrap)
command -v curl >/dev/null || missing+=(curl)
if ((${#missing[@]})); then
    mapfile -t missing < <(printf '%s\n' "${missing[@]}" | sort -u)
    echo "docker_engine: installing ${missing[*]} (Debian packages)"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

if ! docker info >/dev/null 2>&1; then
    log=${DOCKERD_LOG:-/tmp/dockerd.log}
    echo "docker_engine: starting dockerd (log: $log)"
    # setsid: the engine outlives this script and the make that ran it.
    setsid dockerd >"$log" 2>&1 </dev/null &
    for _ in $(seq 1 60); do
        docker info >/dev/null 2>&1 && break
        sleep 1
    done
    docker info >/dev/null 2>&1 || { echo "docker_engine: dockerd did not answer in 60 s; see $log" >&2; exit 1; }
fi
echo "docker_engine: $(docker version --format 'engine {{.Server.Version}}, client {{.Client.Version}}'), $(docker-compose version --short 2>/dev/null | sed 's/^/docker-compose /')"
