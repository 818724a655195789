#!/usr/bin/env bash
# make image: build localhost/ambimesh:<version> from Debian packages only (no registry).
#  1. base image localhost/ambimesh-base:bookworm: debootstrap --variant=minbase, imported
#     with podman (once; reused while it exists);
#  2. wheels of ambimesh and its dependencies, made here with pip (the build stages have
#     no PyPI: they install from these);
#  3. buildah bud --isolation chroot of deploy/image/Containerfile (the default OCI
#     isolation cannot run RUN steps on this machine: docs/install.md).
# Prints each step's duration. Needs root, podman, buildah, debootstrap (setup.sh --image).
set -euo pipefail
cd "$(dirname "$0")/../.."
work=${AMBIMESH_IMAGE_WORK:-/var/tmp/ambimesh-image}
base=localhost/ambimesh-base:bookworm
version=$(.venv/bin/python -c 'import importlib.metadata as m; print(m.version("ambimesh"))')
image=localhost/ambimesh:$version
say() { printf '[image] %s\n' "$*"; }
step() { say "$1: $(( SECONDS - started )) s"; started=$SECONDS; }
mkdir -p "$work"
started=$SECONDS
total=$SECONDS

if podman image exists "$base"; then
    say "base $base present"
else
    mirror=$(awk '/^URIs:/ { print $2; exit } /^deb / { print $2; exit }' \
        /etc/apt/sources.list.d/debian.sources /etc/apt/sources.list 2>/dev/null || true)
    mirror=${mirror:-http://deb.debian.org/debian}
    say "debootstrap bookworm from $mirror"
    rm -rf "$work/rootfs"
    debootstrap --variant=minbase bookworm "$work/rootfs" "$mirror" >"$work/debootstrap.log"
    tar -C "$work/rootfs" -c . | podman import --quiet --change 'CMD ["/bin/bash"]' - "$base" >/dev/null
    rm -rf "$work/rootfs"
    step "base image (debootstrap + import)"
fi

rm -rf "$work/context"
mkdir -p "$work/context"
cp deploy/image/Containerfile deploy/image/with-kernel-headers "$work/context/"
.venv/bin/pip wheel --quiet --wheel-dir "$work/context/wheels" . >"$work/wheels.log" 2>&1 \
    || { cat "$work/wheels.log"; exit 1; }
step "wheels ($(ls "$work/context/wheels" | wc -l) files)"

buildah bud --quiet --isolation chroot --layers --build-arg "BASE=$base" \
    -f "$work/context/Containerfile" -t "$image" "$work/context" >"$work/build.log" 2>&1 \
    || { tail -40 "$work/build.log"; exit 1; }
step "buildah bud"
size=$(podman image inspect --format '{{.Size}}' "$image")
say "built $image ($(( size / 1000000 )) MB) in $(( SECONDS - total )) s"
