#!/usr/bin/env bash
# Fill wheelhouse/ with every wheel the image needs (the project's runtime dependencies at the
# pinned torch, plus pip, setuptools and wheel to build the project), so that
# `docker build --build-arg PIP_OFFLINE=true .` installs with no package index at all: for
# air-gapped hosts, and for build hosts whose containers do not trust the host's TLS proxy.
#
#   scripts/fill_wheelhouse.sh                 # CPython 3.11 (Debian bookworm), this machine's arch
#   PYTHON_VERSION=3.12 ARCH=aarch64 scripts/fill_wheelhouse.sh
#
# The wheels are for the image's Python and platform, not this host's: pip is told the target
# (glibc-based Linux, manylinux). torch comes from wherever this host's pip finds `torch==` the pin
# in constraints.txt (PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu for the CPU build
# from PyTorch's own index; the default index serves the CUDA build on Linux x86_64).
set -euo pipefail
cd "$(dirname "$0")/.."

python=${PYTHON:-python3}
python_version=${PYTHON_VERSION:-3.11}
arch=${ARCH:-$(uname -m)}
abi=cp${python_version/./}
dest=${WHEELHOUSE:-wheelhouse}

platforms=(--platform "manylinux2014_$arch")
for glibc in $(seq 17 36); do  # bookworm has glibc 2.36
    platforms+=(--platform "manylinux_2_${glibc}_$arch")
done

mkdir -p "$dest"
"$python" -m pip download --quiet --disable-pip-version-check --dest "$dest" \
    --constraint constraints.txt --only-binary=:all: \
    --python-version "$python_version" --implementation cp --abi "$abi" "${platforms[@]}" \
    pip "setuptools>=69" wheel . 2> >(grep -v "is ignored: it is neither" >&2)
count=$(find "$dest" -name '*.whl' | wc -l)
echo "fill_wheelhouse: $count wheels, $(du -sh "$dest" | cut -f1), in $dest/ (CPython $python_version, $arch)"
