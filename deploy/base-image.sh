#!/usr/bin/env bash
# A Debian bookworm image with Python 3.11 and its venv module, built from Debian's packages
# (debootstrap) and imported into podman: for machines that cannot pull python:3.11-slim. Give it
# to the Dockerfiles as --build-arg BASE_IMAGE=localhost/debian-python:bookworm.
# Needs root, debootstrap and podman (apt-get install debootstrap podman runc).
set -euo pipefail
image=${1:-localhost/debian-python:bookworm}
root=$(mktemp -d)
trap 'rm -rf "$root"' EXIT
debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
    bookworm "$root" "${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
tar -C "$root" -c . | podman import --change 'CMD ["python3"]' - "$image"
echo "built $image"
