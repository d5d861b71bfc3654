#!/usr/bin/env bash
# Tracing's cost on fan-out (issue 15): the same release binary with tracing off (A) and on
# at the default 1 % sample (B: trace_exporter otlp to a local stub collector that answers
# 202), through loadtest/ab: three alternated rounds, medians, B/A.
#   cargo build --release --bin switchboard -p switchboard-load
#   docs/bench/2026-12-03-tracing/run.sh [ROUNDS]
# Environment: AB_ONLY (default "fanout-5k-100 fanout-19.5k-5"), AB_OUT, and what
# loadtest/ab and loadtest/run-bench take. The collector's span count is printed at the end.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../../.." && pwd)
BIN=${BIN:-$ROOT/target/release/switchboard}
ROUNDS=${1:-3}
DIR=$(mktemp -d)
PORT=${COLLECTOR_PORT:-28318}
trap 'kill "$COLLECTOR" 2>/dev/null || true; rm -rf "$DIR"' EXIT
# The stub collector: takes every POST, counts the spans of OTLP JSON bodies.
python3 - "$PORT" "$DIR/spans" <<'PY' &
import http.server, json, sys
port, out = int(sys.argv[1]), sys.argv[2]
n = 0
class H(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        global n
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        try:
            for rs in json.loads(body)["resourceSpans"]:
                for ss in rs["scopeSpans"]:
                    n += len(ss["spans"])
        except Exception:
            pass
        open(out, "w").write(str(n))
        self.send_response(202)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"{}")
    def log_message(self, *a):
        pass
http.server.ThreadingHTTPServer(("127.0.0.1", port), H).serve_forever()
PY
COLLECTOR=$!
# B: the same binary, tracing on (exec keeps the pid run-bench measures).
cat >"$DIR/traced" <<SH
#!/usr/bin/env bash
export SWITCHBOARD_TRACE_EXPORTER=otlp
export SWITCHBOARD_TRACE_ENDPOINT=http://127.0.0.1:$PORT/v1/traces
export SWITCHBOARD_TRACE_SAMPLE_RATIO=\${TRACE_RATIO:-0.01}
exec "$BIN" "\$@"
SH
chmod +x "$DIR/traced"
AB_ONLY="${AB_ONLY:-fanout-5k-100 fanout-19.5k-5}" "$ROOT/loadtest/ab" "$BIN" "$DIR/traced" "$ROUNDS"
echo "spans the collector received: $(cat "$DIR/spans" 2>/dev/null || echo 0)"
