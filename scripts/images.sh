#!/usr/bin/env bash
# Builds the container images `gantry-server` and `gantry-runner` (see ../Dockerfile) from
# statically linked release binaries, with no base image to pull. The runner image carries
# the static `gantry` CLI too, which the runner mounts into job containers.
#
#   scripts/images.sh            build ${GANTRY_IMAGE_PREFIX}gantry-{server,runner}:${GANTRY_IMAGE_TAG}
#   scripts/images.sh --push     … and push them (set GANTRY_IMAGE_PREFIX to your registry)
#
# GANTRY_IMAGE_TAG defaults to the workspace version; GANTRY_IMAGE_PREFIX to nothing.
set -euo pipefail
cd "$(dirname "$0")/.."

PUSH=0
case "${1:-}" in
    "") ;;
    --push) PUSH=1 ;;
    *) echo "usage: scripts/images.sh [--push]" >&2; exit 2 ;;
esac

VERSION=$(sed -n 's/^version = "\(.*\)"$/\1/p' Cargo.toml | head -n1)
TAG=${GANTRY_IMAGE_TAG:-$VERSION}
PREFIX=${GANTRY_IMAGE_PREFIX:-}
TRIPLE=$(rustc -vV | sed -n 's/^host: //p')

# glibc, linked statically: the binaries need no file from a base image. With --target, the
# flag applies to the binaries only, not to build scripts and proc-macros.
echo "==> static release build of gantry-server, gantry-runner and gantry ($TRIPLE)"
RUSTFLAGS="-C target-feature=+crt-static" \
    cargo build --release --locked --target "$TRIPLE" -p gantry-server -p gantry-runner -p gantry-cli --bins
OUT=${CARGO_TARGET_DIR:-target}/$TRIPLE/release

CONTEXT=$(mktemp -d)
trap 'rm -rf "$CONTEXT"' EXIT
for bin in gantry-server gantry-runner gantry; do
    headers=$(readelf -l "$OUT/$bin")
    if grep -q 'program interpreter' <<<"$headers"; then
        echo "error: $OUT/$bin is dynamically linked; the images need a static binary" >&2
        exit 1
    fi
    install -m 0555 "$OUT/$bin" "$CONTEXT/$bin"
done
mkdir -m 0700 "$CONTEXT/data" "$CONTEXT/state"

for image in server runner; do
    name="${PREFIX}gantry-$image:$TAG"
    echo "==> docker build $name"
    # The classic builder: BuildKit is not installed everywhere, and nothing here needs it.
    if ! DOCKER_BUILDKIT=0 docker build -q --target "$image" -t "$name" -f Dockerfile "$CONTEXT" \
        >/dev/null 2>"$CONTEXT/build.log"; then
        cat "$CONTEXT/build.log" >&2
        exit 1
    fi
    if [ "$PUSH" = 1 ]; then
        docker push "$name"
    fi
    docker image ls --format '    {{.Repository}}:{{.Tag}}  {{.Size}}' "$name"
done
