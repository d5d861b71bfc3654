#!/usr/bin/env bash
# Where the time goes, per backend and shard count (issue 16): for each server wrapper given,
#  1. a connect storm (5,000 connections, each subscribing to one of 50 rooms) under
#     `perf stat`: syscalls, context switches and migrations per connection;
#  2. fan-out at 5,000 x 100/s: `perf stat` over 6 s of traffic (per delivery), then
#     `perf record -g` over 6 s more, reported as the top symbols (self time) and the split
#     user / kernel.
# Loopback only, bounded in time (each step has a timeout). Needs perf and root (or
# perf_event_paranoid <= 1). Each wrapper must `exec` the server (the pid is perf's target).
#
#   docs/bench/2026-12-04-io_uring/profile.sh OUT_DIR WRAPPER...
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../../.." && pwd)"
OUT="${1:?usage: profile.sh OUT_DIR WRAPPER...}"
shift
LOAD="${SB_LOAD:-$ROOT/target/release/switchboard-load}"
PORT="${SB_PORT:-18091}"
URL="ws://127.0.0.1:$PORT/ws"
mkdir -p "$OUT"
EVENTS='syscalls:sys_enter_epoll_wait,syscalls:sys_enter_io_uring_enter,syscalls:sys_enter_accept4,syscalls:sys_enter_recvfrom,syscalls:sys_enter_sendto,syscalls:sys_enter_sendmsg,syscalls:sys_enter_writev,syscalls:sys_enter_write,syscalls:sys_enter_read,syscalls:sys_enter_futex,context-switches,cpu-migrations,task-clock'

start() { # wrapper -> SERVER_PID
  SWITCHBOARD_HOST=127.0.0.1 SWITCHBOARD_PORT="$PORT" SWITCHBOARD_RATE_LIMIT_PER_SEC=100000 \
    SWITCHBOARD_RATE_LIMIT_BURST=100000 SWITCHBOARD_MAX_CONNECTIONS_PER_ROOM=100000 \
    SWITCHBOARD_LOG_LEVEL=warn "$1" >>"$OUT/server.log" 2>&1 &
  SERVER_PID=$!
  for _ in $(seq 1 100); do
    (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null && { sleep 0.5; return 0; }
    sleep 0.1
  done
  echo "server $1 did not listen" >&2
  return 1
}
stop() {
  kill "$SERVER_PID" 2>/dev/null || true
  wait "$SERVER_PID" 2>/dev/null || true
}

for wrapper in "$@"; do
  name="$(basename "$wrapper")"
  echo "=== $name"
  # 1. connect storm
  start "$wrapper"
  perf stat -e "$EVENTS" -p "$SERVER_PID" -o "$OUT/$name-connect.stat" &
  perf_pid=$!
  sleep 0.5
  timeout 120 "$LOAD" connect --connections 5000 --rooms 50 --in-flight 256 --url "$URL" \
    --server-pid "$SERVER_PID" --threads 2 --label "$name-connect" --json-only \
    2>/dev/null | grep '^{' | tail -n 1 >"$OUT/$name-connect.json" || true
  kill -INT "$perf_pid"
  wait "$perf_pid" || true
  stop
  # 2. fan-out: stat, then record, during one 20 s run
  start "$wrapper"
  timeout 120 "$LOAD" fanout --connections 5000 --rooms 1 --publishers 2 --rate 100 \
    --duration 20 --batch-us 100 --url "$URL" --server-pid "$SERVER_PID" --threads 2 \
    --label "$name-fanout" --json-only 2>/dev/null | grep '^{' | tail -n 1 \
    >"$OUT/$name-fanout.json" &
  gen_pid=$!
  # connects and subscribes take about 2 s at 5,000; the traffic phase follows
  sleep 5
  perf stat -e "$EVENTS" -p "$SERVER_PID" -o "$OUT/$name-fanout.stat" -- sleep 6
  perf record -F 1999 -g -p "$SERVER_PID" -o "$OUT/$name-fanout.data" -- sleep 6 2>/dev/null
  wait "$gen_pid" || true
  stop
  # (|| true: head closes the pipe early, which pipefail would count as a failure)
  perf report -i "$OUT/$name-fanout.data" --no-children -g none --sort sym --stdio 2>/dev/null |
    grep -E '^ +[0-9]' | head -n 40 >"$OUT/$name-fanout.top" || true
  perf report -i "$OUT/$name-fanout.data" --no-children -g none --sort dso --stdio 2>/dev/null |
    grep -E '^ +[0-9]' | head -n 10 >"$OUT/$name-fanout.dso" || true
  # the kernel's share by caller family, for "where the remaining time goes"
  perf report -i "$OUT/$name-fanout.data" --no-children -g caller,0.5,callee --sort sym \
    --stdio 2>/dev/null | head -n 400 >"$OUT/$name-fanout.callers" || true
  # inclusive shares: the receiver's TCP input run in the sender's context on loopback
  # (net_rx_action under the send), the send path itself, wake-ups and the scheduler
  perf report -i "$OUT/$name-fanout.data" --children -g none --sort sym --stdio 2>/dev/null |
    grep -E '\] (net_rx_action|tcp_sendmsg_locked|tcp_sendmsg|sock_sendmsg|____sys_sendmsg|__sys_sendto|io_submit_sqes|sock_def_readable|ep_poll_callback|schedule|finish_task_switch\.isra\.0|__x64_sys_io_uring_enter|__x64_sys_epoll_wait|__x64_sys_sendmsg|__x64_sys_sendto|do_syscall_64|entry_SYSCALL_64_after_hwframe)$' \
    >"$OUT/$name-fanout.incl" || true
  rm -f "$OUT/$name-fanout.data"
done
echo "results in $OUT"
