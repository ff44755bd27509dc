#!/usr/bin/env bash
# Build the base images a machine without a registry needs, from Debian's packages alone:
#   distill-base:bookworm       Debian bookworm (minbase) with python3 (3.11) and python3-venv,
#                               made with debootstrap + `docker import` (the Dockerfile's BASE_IMAGE)
#   distill-prometheus:debian   that base plus Debian's prometheus binary (docker/prometheus.Dockerfile),
#                               standing in for prom/prometheus in docker/compose.offline.yml
# An image that already exists is kept (FORCE=1 rebuilds). Needs root, debootstrap and a Docker
# engine (scripts/docker_engine.sh). Takes about a minute the first time.
set -euo pipefail
cd "$(dirname "$0")/.."

base=${BASE_IMAGE:-distill-base:bookworm}
prometheus=${PROMETHEUS_IMAGE:-distill-prometheus:debian}
suite=${DEBIAN_SUITE:-bookworm}
force=${FORCE:-0}

# The Debian mirror this machine's apt uses (deb822 .sources first, then sources.list).
mirror=${DEBIAN_MIRROR:-$(grep -rhoE '^URIs: *\S+' /etc/apt/sources.list.d/*.sources 2>/dev/null \
    | grep -v security | head -1 | awk '{print $2}')}
[ -n "$mirror" ] || mirror=$(grep -hoE '^deb +\S+' /etc/apt/sources.list 2>/dev/null | head -1 | awk '{print $2}')
[ -n "$mirror" ] || mirror=http://deb.debian.org/debian

exists() { [ "$force" != 1 ] && docker image inspect "$1" >/dev/null 2>&1; }

if exists "$base"; then
    echo "local_images: $base exists"
else
    rootfs=$(mktemp -d /tmp/distill-rootfs.XXXXXX)
    trap 'rm -rf "$rootfs"' EXIT
    echo "local_images: debootstrap $suite from $mirror -> $base"
    started=$SECONDS
    debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
        "$suite" "$rootfs" "$mirror" >/tmp/distill-debootstrap.log 2>&1 \
        || { echo "debootstrap failed: /tmp/distill-debootstrap.log" >&2; exit 1; }
    rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
    tar -C "$rootfs" -c . | docker import \
        --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        --change 'CMD ["/bin/bash"]' - "$base" >/dev/null
    rm -rf "$rootfs"
    trap - EXIT
    echo "local_images: $base built in $((SECONDS - started)) s"
fi

if exists "$prometheus"; then
    echo "local_images: $prometheus exists"
else
    context=$(mktemp -d /tmp/distill-prometheus.XXXXXX)
    trap 'rm -rf "$context"' EXIT
    # apt-get download runs as _apt where it can: give it a folder it may write.
    chmod 777 "$context"
    (cd "$context" && apt-get download -qq prometheus)
    cp docker/prometheus.Dockerfile "$context/Dockerfile"
    docker build -q --build-arg "BASE_IMAGE=$base" -t "$prometheus" "$context" >/dev/null
    rm -rf "$context"
    trap - EXIT
    echo "local_images: $prometheus built ($(docker run --rm --entrypoint prometheus "$prometheus" --version 2>&1 | head -1))"
fi
