#!/usr/bin/env bash
# TLS cost (issue 15): memory per idle connection and set-up CPU per connection, plain
# against TLS, three alternated runs each, a fresh release server per run.
#   cargo build --release --bin switchboard --example tls_idle
#   docs/bench/2026-12-03-tls/run.sh [N]   # N connections per run, default 5000
# Writes one JSON line per run to stdout (examples/tls_idle.rs says what each field is).
set -euo pipefail
N=${1:-5000}
ROOT=$(cd "$(dirname "$0")/../../.." && pwd)
BIN=$ROOT/target/release/switchboard
PROBE=$ROOT/target/release/examples/tls_idle
DIR=$(mktemp -d)
trap 'rm -rf "$DIR"' EXIT
# A CA and a server certificate for 127.0.0.1 (EC P-256, as the tests make them).
cd "$DIR"
openssl req -x509 -nodes -days 2 -subj /CN=bench-ca -newkey ec -pkeyopt ec_paramgen_curve:P-256 \
  -keyout ca.key -out ca.crt -addext basicConstraints=critical,CA:TRUE \
  -addext keyUsage=critical,keyCertSign,cRLSign 2>/dev/null
openssl req -new -nodes -subj /CN=127.0.0.1 -newkey ec -pkeyopt ec_paramgen_curve:P-256 \
  -keyout server.key -out server.csr 2>/dev/null
printf 'basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\nsubjectAltName=IP:127.0.0.1\n' > ext
openssl x509 -req -in server.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 2 -extfile ext \
  -out server.crt 2>/dev/null
PLAIN_PORT=28191
TLS_PORT=28192
for run in 1 2 3; do
  for mode in plain tls; do
    SWITCHBOARD_PORT=$PLAIN_PORT SWITCHBOARD_TLS_PORT=$TLS_PORT \
      SWITCHBOARD_TLS_CERT_FILE=$DIR/server.crt SWITCHBOARD_TLS_KEY_FILE=$DIR/server.key \
      SWITCHBOARD_LOG_LEVEL=warn "$BIN" 2>"$DIR/server.log" &
    PID=$!
    for _ in $(seq 100); do
      curl -fs "http://127.0.0.1:$PLAIN_PORT/live" >/dev/null 2>&1 && break
      sleep 0.1
    done
    if [ "$mode" = tls ]; then
      "$PROBE" --pid $PID --port $TLS_PORT --n "$N" --tls --ca "$DIR/ca.crt"
    else
      "$PROBE" --pid $PID --port $PLAIN_PORT --n "$N"
    fi
    kill -TERM $PID
    wait $PID || true
  done
done
