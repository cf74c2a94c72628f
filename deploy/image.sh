#!/usr/bin/env bash
# Build the cascadegw container image with podman, from the top-level Dockerfile.
#
# No container registry has to be reachable: when the official python:3.11-slim-bookworm
# cannot be pulled, a base is made here with debootstrap (Debian bookworm, python3, venv) and
# imported as localhost/cascadegw-base:bookworm. Then the image is built and, where the
# machine can run containers, started once to check that it answers `cascadegw --version`.
#
#   deploy/image.sh [tag]        (default tag: cascadegw:local; `make image` runs this)
set -euo pipefail
cd "$(dirname "$0")/.."

tag=${1:-cascadegw:local}
official=docker.io/library/python:3.11-slim-bookworm
local_base=localhost/cascadegw-base:bookworm
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}

need() { command -v "$1" >/dev/null 2>&1 || { echo "image: $1 is needed ($2)" >&2; exit 2; }; }
need podman "apt-get install podman"

if podman image exists "$official" || podman pull --quiet "$official" >/dev/null 2>&1; then
    base=$official
elif podman image exists "$local_base"; then
    base=$local_base
else
    need debootstrap "apt-get install debootstrap"
    echo "image: no registry; making $local_base with debootstrap from $mirror"
    root=$(mktemp -d)
    trap 'rm -rf "$root"' EXIT
    debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
        bookworm "$root" "$mirror" >/dev/null
    rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
    tar -C "$root" -c . | podman import --change 'CMD ["/bin/bash"]' - "$local_base" >/dev/null
    rm -rf "$root"
    trap - EXIT
    base=$local_base
fi

echo "image: building $tag on $base"
# the host's CA bundle goes in as a build secret, for networks behind a TLS-inspecting proxy;
# chroot isolation builds where the machine's cgroups do not let crun create containers
ca=${PIP_CERT:-/etc/ssl/certs/ca-certificates.crt}
secret=()
[ -s "$ca" ] && secret=(--secret "id=pip_ca,src=$ca")
podman build --quiet --format docker --isolation=chroot "${secret[@]}" --build-arg "BASE=$base" --tag "$tag" . >/dev/null
podman image inspect "$tag" --format 'image: {{.Id}} {{.Size}} bytes, user {{.Config.User}}, healthcheck {{.Config.Healthcheck.Test}}'

# Start it once: the gateway comes up on its built-in config, answers its own healthcheck
# inside the container, and drains on `podman stop`. Some machines cannot run containers
# with podman's defaults: crun refuses on hybrid cgroups (runc does not), and raising
# RLIMIT_NOFILE/RLIMIT_NPROC above the caller's limits is refused, so the limits are set to
# ones the caller holds.
run=(podman)
command -v runc >/dev/null 2>&1 && run+=(--runtime runc)
limits=(--ulimit "nofile=1024:$(ulimit -Hn)" --ulimit nproc=256:256)
name=cascadegw-image-check
"${run[@]}" rm --force "$name" >/dev/null 2>&1 || true
if ! version=$("${run[@]}" run --rm "${limits[@]}" "$tag" --version 2>/dev/null); then
    echo "image: built, but this machine cannot run containers (podman run failed); see README"
    exit 0
fi
echo "image: runs: $version"
"${run[@]}" run --detach --name "$name" "${limits[@]}" "$tag" >/dev/null 2>&1
trap '"${run[@]}" rm --force "$name" >/dev/null 2>&1 || true' EXIT
for _ in $(seq 1 60); do
    if "${run[@]}" exec "$name" cascadegw healthcheck --ready >/dev/null 2>&1; then
        echo "image: started; healthcheck --ready answers inside the container"
        break
    fi
    sleep 0.5
done
"${run[@]}" exec "$name" cascadegw healthcheck --ready >/dev/null 2>&1 \
    || { echo "image: the container did not become ready:" >&2; "${run[@]}" logs "$name" >&2; exit 1; }
"${run[@]}" stop --time 20 "$name" >/dev/null 2>&1
code=$("${run[@]}" inspect "$name" --format '{{.State.ExitCode}}')
echo "image: podman stop drained it, exit code $code"
[ "$code" = 0 ]
