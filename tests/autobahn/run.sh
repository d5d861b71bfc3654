#!/usr/bin/env bash
# Autobahn WebSocket conformance run against the server's echo endpoint.
#
#   tests/autobahn/run.sh [--update] [SERVER_BIN]   run the suite, judge it (see compare.py)
#   tests/autobahn/run.sh --install-only            only make sure kosoku is installed
#
# Starts SERVER_BIN (default: $TARGET_DIR/release/switchboard) on a free loopback port with
# `echo_path: /` and limits large enough for Autobahn's 16 MiB messages, waits for
# `GET /live` = 200, runs kosoku (the Autobahn fuzzing client, once per case group; 12.* and
# 13.* are permessage-deflate, which the server does not negotiate), normalises its reports to
# $TARGET_DIR/autobahn/results.json and compares that with tests/autobahn/expected.json
# (compare.py). Fails on any failing case, on any case worse than expected or not run, if
# kosoku overruns its time limit, or if the server dies or logs a panic. --update rewrites
# expected.json from this run (a failing case still fails the run).
# Logs: $TARGET_DIR/autobahn/{server.log,kosoku.log}; reports: .../autobahn/reports/<group>/.
#
# TARGET_DIR is $CARGO_TARGET_DIR, else ./target. kosoku lives in a venv at
# $TARGET_DIR/ci-venv, created on first use.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
HERE="$ROOT/tests/autobahn"
TARGET_DIR="${CARGO_TARGET_DIR:-$ROOT/target}"
case "$TARGET_DIR" in /*) ;; *) TARGET_DIR="$ROOT/$TARGET_DIR" ;; esac
VENV="$TARGET_DIR/ci-venv"
# AUTOBAHN_IO_BACKEND=epoll|io_uring runs the server on that I/O backend (default: the
# server's default), with its results under $TARGET_DIR/autobahn-<backend>.
IO_BACKEND="${AUTOBAHN_IO_BACKEND:-}"
OUT="$TARGET_DIR/autobahn${IO_BACKEND:+-$IO_BACKEND}"
KOSOKU_VERSION="0.1.0"

# Autobahn case groups run one kosoku process each; 12 and 13 are permessage-deflate, which
# the server does not negotiate. Autobahn has no group 8 or 11.
CASE_GROUPS=(1 2 3 4 5 6 7 9 10)
EXCLUDED_GROUPS=(12 13)

# Limits, each named once.
KOSOKU_TIME_LIMIT_SECS="${AUTOBAHN_TIME_LIMIT_SECS:-1200}" # all groups; ~1-3 min is normal
GROUP_TIME_LIMIT_SECS=600                                  # one group (9.* is the slow one)
GROUP_ATTEMPTS_MAX=2                                       # kosoku runs per group when it crashes
LIVE_WAIT_SECS=30                                          # server start to GET /live = 200
SERVER_STOP_WAIT_SECS=10                                   # SIGTERM to exit, then SIGKILL
SERVER_LOG_TAIL_LINES=40                                   # printed when the server misbehaves

die() {
  echo "autobahn: error: $*" >&2
  exit 1
}

# Create the venv and install the pinned kosoku unless it is already there (idempotent).
ensure_kosoku() {
  local have=""
  if [[ -x "$VENV/bin/kosoku" ]]; then
    have="$("$VENV/bin/python" -c 'import importlib.metadata as m; print(m.version("kosoku"))' 2>/dev/null || true)"
  fi
  if [[ "$have" == "$KOSOKU_VERSION" ]]; then
    echo "autobahn: kosoku $KOSOKU_VERSION already installed in $VENV"
    return 0
  fi
  command -v python3 >/dev/null ||
    die "python3 not found: install it (Debian: apt-get install -y python3 python3-venv)"
  echo "autobahn: installing kosoku==$KOSOKU_VERSION into $VENV"
  if ! python3 -m venv "$VENV"; then
    die "could not create a Python venv at $VENV: install the venv module (Debian: apt-get install -y python3-venv) and run again"
  fi
  if ! "$VENV/bin/pip" install --disable-pip-version-check --no-input --quiet "kosoku==$KOSOKU_VERSION"; then
    die "pip could not install kosoku==$KOSOKU_VERSION from PyPI; install it by hand: $VENV/bin/pip install kosoku==$KOSOKU_VERSION"
  fi
}

UPDATE=0
INSTALL_ONLY=0
SERVER_BIN=""
for arg in "$@"; do
  case "$arg" in
    --update) UPDATE=1 ;;
    --install-only) INSTALL_ONLY=1 ;;
    -h | --help)
      awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "${BASH_SOURCE[0]}"
      exit 0
      ;;
    -*) die "unknown option $arg (see --help)" ;;
    *)
      [[ -z "$SERVER_BIN" ]] || die "more than one SERVER_BIN given"
      SERVER_BIN="$arg"
      ;;
  esac
done

ensure_kosoku
[[ "$INSTALL_ONLY" == 1 ]] && exit 0

SERVER_BIN="${SERVER_BIN:-$TARGET_DIR/release/switchboard}"
[[ -x "$SERVER_BIN" ]] ||
  die "server binary $SERVER_BIN not found: build it with 'cargo build --release --bin switchboard' or pass its path"

mkdir -p "$OUT"
rm -rf "$OUT/reports" "$OUT/results.json"
SERVER_LOG="$OUT/server.log"
KOSOKU_LOG="$OUT/kosoku.log"

PORT="$("$VENV/bin/python" -c 'import socket
s = socket.socket()
s.bind(("127.0.0.1", 0))
print(s.getsockname()[1])')"

SERVER_PID=""
stop_server() {
  [[ -n "$SERVER_PID" ]] || return 0
  if kill -0 "$SERVER_PID" 2>/dev/null; then
    kill -TERM "$SERVER_PID" 2>/dev/null || true
    local waited=0
    while kill -0 "$SERVER_PID" 2>/dev/null && ((waited < SERVER_STOP_WAIT_SECS * 10)); do
      sleep 0.1
      waited=$((waited + 1))
    done
    if kill -0 "$SERVER_PID" 2>/dev/null; then
      echo "autobahn: server did not exit ${SERVER_STOP_WAIT_SECS}s after SIGTERM; killing it" >&2
      kill -KILL "$SERVER_PID" 2>/dev/null || true
    fi
  fi
  wait "$SERVER_PID" 2>/dev/null || true
  SERVER_PID=""
}
trap stop_server EXIT
trap 'exit 130' INT TERM

server_log_tail() {
  echo "---- last $SERVER_LOG_TAIL_LINES lines of $SERVER_LOG ----" >&2
  tail -n "$SERVER_LOG_TAIL_LINES" "$SERVER_LOG" >&2 || true
  echo "----" >&2
}

# Start from a clean environment: no inherited SWITCHBOARD_* / WEBSOCKET_* setting may change
# what is tested.
unset_args=()
for name in $(compgen -e); do
  case "$name" in SWITCHBOARD_* | WEBSOCKET_*) unset_args+=(-u "$name") ;; esac
done

echo "autobahn: starting $SERVER_BIN on 127.0.0.1:$PORT (log: $SERVER_LOG)"
env "${unset_args[@]}" \
  SWITCHBOARD_HOST=127.0.0.1 \
  SWITCHBOARD_PORT="$PORT" \
  SWITCHBOARD_ECHO_PATH=/ \
  SWITCHBOARD_MAX_MESSAGE_SIZE=20MiB \
  SWITCHBOARD_SEND_QUEUE_BYTES_MAX=64MiB \
  SWITCHBOARD_RATE_LIMIT_PER_SEC=100000 \
  SWITCHBOARD_RATE_LIMIT_BURST=100000 \
  SWITCHBOARD_SHUTDOWN_TIMEOUT=5s \
  ${IO_BACKEND:+SWITCHBOARD_IO_BACKEND="$IO_BACKEND"} \
  "$SERVER_BIN" >"$SERVER_LOG" 2>&1 &
SERVER_PID=$!

# Wait for GET /live = 200 (bounded), failing early if the server exits.
"$VENV/bin/python" - "$PORT" "$LIVE_WAIT_SECS" "$SERVER_PID" <<'EOF' || { server_log_tail; die "server did not become live"; }
import os, sys, time, urllib.request
port, wait_secs, pid = int(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3])
deadline = time.monotonic() + wait_secs
last = "no answer"
while time.monotonic() < deadline:
    try:
        os.kill(pid, 0)
    except OSError:
        sys.exit(f"autobahn: server exited during start ({last})")
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/live", timeout=2) as r:
            if r.status == 200:
                sys.exit(0)
            last = f"GET /live answered {r.status}"
    except Exception as e:  # refused while starting, or an HTTP error status
        last = f"GET /live: {e}"
    time.sleep(0.1)
sys.exit(f"autobahn: no 200 on GET /live within {wait_secs:.0f}s ({last})")
EOF
echo "autobahn: server live; running kosoku (time limit ${KOSOKU_TIME_LIMIT_SECS}s in all, ${GROUP_TIME_LIMIT_SECS}s per group)"

# kosoku writes its report only when it finishes, so run it once per case group: a group that
# hangs (9.* waits up to 100 s per case) loses only its own results, which then count as
# "did not run" below. The last run takes every case no listed group has, if any.
excludes=()
for g in "${EXCLUDED_GROUPS[@]}"; do excludes+=(-x "$g.*"); done
rest=("${excludes[@]}")
for g in "${CASE_GROUPS[@]}"; do rest+=(-x "$g.*"); done
report_dirs=()
: >"$KOSOKU_LOG"
deadline=$((SECONDS + KOSOKU_TIME_LIMIT_SECS))
kosoku_trouble=0
for g in "${CASE_GROUPS[@]}" rest; do
  if [[ "$g" == rest ]]; then selection=("${rest[@]}"); else selection=(-i "$g.*" "${excludes[@]}"); fi
  dir="$OUT/reports/$g"
  group_log="$OUT/kosoku-$g.log"
  for ((attempt = 1; attempt <= GROUP_ATTEMPTS_MAX; attempt++)); do
    remaining=$((deadline - SECONDS))
    if ((remaining <= 0)); then
      echo "autobahn: group $g NOT RUN: the ${KOSOKU_TIME_LIMIT_SECS}s limit is used up" >&2
      kosoku_trouble=1
      break
    fi
    limit=$((remaining < GROUP_TIME_LIMIT_SECS ? remaining : GROUP_TIME_LIMIT_SECS))
    rm -rf "$dir"
    start=$SECONDS
    set +e
    timeout --kill-after=10 "$limit" \
      "$VENV/bin/kosoku" --mode fuzzingclient --parallelism 1 "${selection[@]}" \
      -o "$dir" "127.0.0.1:$PORT" >"$group_log" 2>&1
    rc=$?
    set -e
    took=$((SECONDS - start))
    { echo "== kosoku group $g, attempt $attempt: exit $rc after ${took}s"; cat "$group_log"; } >>"$KOSOKU_LOG"
    # kosoku exits 0 when every case passed and 1 when one failed (judged below from its
    # report). kosoku 0.1.0 sometimes aborts (134) while exiting, after its report is
    # written: a report is used when kosoku printed that it wrote all of it.
    wrote="$(sed -nE 's/^wrote reports for ([0-9]+) cases to .*/\1/p' "$group_log")"
    if [[ "$rc" == 124 || "$rc" == 137 ]]; then
      echo "autobahn: group $g: kosoku overran its ${limit}s limit; its cases count as not run" >&2
      kosoku_trouble=1
      break
    elif [[ -n "$wrote" && -f "$dir/index.json" && ("$rc" == 0 || "$rc" == 1 || "$rc" == 134) ]]; then
      report_dirs+=("$dir")
      note=""
      [[ "$rc" == 134 ]] && note="; kosoku aborted while exiting, after writing its report"
      echo "autobahn: group $g: $wrote cases in ${took}s (kosoku exit $rc$note)"
      break
    elif [[ "$g" == rest && "$rc" == 0 && -z "$wrote" ]]; then
      break # no case outside the listed groups
    fi
    echo "autobahn: group $g: kosoku exited with $rc without a complete report; its log:" >&2
    tail -n 20 "$group_log" >&2
    if ((attempt == GROUP_ATTEMPTS_MAX)); then
      kosoku_trouble=1
    else
      echo "autobahn: group $g: retrying" >&2
    fi
  done
done

server_ok=1
if ! kill -0 "$SERVER_PID" 2>/dev/null; then
  echo "autobahn: the server exited during the run" >&2
  server_ok=0
fi
if grep -q "panicked" "$SERVER_LOG"; then
  echo "autobahn: the server logged a panic" >&2
  grep -m 5 -A 3 "panicked" "$SERVER_LOG" >&2 || true
  server_ok=0
fi
stop_server
[[ "$server_ok" == 1 ]] || server_log_tail

((${#report_dirs[@]} > 0)) || die "kosoku produced no report at all (log: $KOSOKU_LOG)"
python3 "$HERE/compare.py" normalize "$OUT/results.json" "${report_dirs[@]}"
check_args=(check)
for dir in "${report_dirs[@]}"; do check_args+=(--reports "$dir"); done
[[ "$UPDATE" == 1 ]] && check_args+=(--update)
set +e
python3 "$HERE/compare.py" "${check_args[@]}" "$OUT/results.json" "$HERE/expected.json"
compare_rc=$?
set -e
echo "autobahn: full reports: $OUT/reports/<group>/index.html"

[[ "$server_ok" == 1 ]] || die "server crashed or panicked during the run"
[[ "$kosoku_trouble" == 0 ]] || die "kosoku did not complete every case group (see above)"
exit "$compare_rc"
