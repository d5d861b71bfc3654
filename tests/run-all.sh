#!/usr/bin/env bash
# The one test command: `bash tests/run-all.sh` (CI runs it through .ci/run).
#
# On a fresh Debian machine, as root, with no standard input, it installs what it needs
# (idempotent: kosoku in a venv under $TARGET_DIR/ci-venv, Debian packages only when missing,
# among them `postgresql` for the message store tests, which start throwaway clusters, and
# `redis-server`/`redis-tools` for the Redis tests, which start their own servers; the
# `tansu` Kafka broker for the Kafka tests, built once with cargo install into
# $HOME/.cache/switchboard/tansu-<version> (about 15 minutes cold, reused after)),
# then runs, each under a section header and a time limit:
#   1. cargo fmt --all -- --check
#   2. cargo clippy --workspace --all-targets -- -D warnings
#   3. cargo test --workspace --no-fail-fast (every unit, integration and doc test; ignored tests
#                                         are listed by name in the summary, never hidden)
#   4. python3 -m unittest tests/autobahn/test_compare.py
#   5. cargo build --release --bin switchboard
#   6. tests/autobahn/run.sh             (Autobahn conformance against the echo endpoint)
#   7. the integration tests again, every server on epoll (SB_TEST_IO_BACKEND=epoll)
#   8. Autobahn again on epoll
# Steps 3 and 6 run on the default backend, io_uring. On a kernel that refuses io_uring the
# servers of 3 and 6 fall back to epoll: the summary says so, and that fails the run only
# when SB_REQUIRE_IO_URING=1.
# A failing step does not stop the later ones (except that Autobahn needs step 5), so one run
# shows every problem. Exit status is non-zero if any step failed; the last line is
# `steps: N passed, M failed`.
#
# Honoured: CARGO_TARGET_DIR (default ./target), CI=true (no incremental builds),
# AUTOBAHN_TIME_LIMIT_SECS (see tests/autobahn/run.sh).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
TARGET_DIR="${CARGO_TARGET_DIR:-$ROOT/target}"
case "$TARGET_DIR" in /*) ;; *) TARGET_DIR="$ROOT/$TARGET_DIR" ;; esac
LOG_DIR="$TARGET_DIR/run-all"
mkdir -p "$LOG_DIR"

# Time limit of each step, in seconds: a hang fails its step instead of eating CI's 90 minutes.
# Typical on the 2-core machine: fmt seconds, clippy/test/release build a few minutes each,
# Autobahn a few minutes.
FMT_TIME_LIMIT_SECS=300
CLIPPY_TIME_LIMIT_SECS=1800
TEST_TIME_LIMIT_SECS=2400
UNITTEST_TIME_LIMIT_SECS=120
BUILD_TIME_LIMIT_SECS=1800
# Autobahn's own limit on kosoku is AUTOBAHN_TIME_LIMIT_SECS; this one also covers server
# start and stop.
AUTOBAHN_TIME_LIMIT_SECS="${AUTOBAHN_TIME_LIMIT_SECS:-1200}"
export AUTOBAHN_TIME_LIMIT_SECS
AUTOBAHN_STEP_TIME_LIMIT_SECS=$((AUTOBAHN_TIME_LIMIT_SECS + 120))
# SIGTERM to SIGKILL when a step overruns.
KILL_AFTER_SECS=30

export RUST_BACKTRACE=1
export PYTHONDONTWRITEBYTECODE=1 # no __pycache__ in the work tree
if [[ "${CI:-}" == "true" ]]; then
  export CARGO_INCREMENTAL=0 # a fresh clone gains nothing from incremental state
fi

RUN_START=$SECONDS
STEP_NAMES=()
STEP_RESULTS=()
STEP_SECS=()

section() {
  echo
  echo "================================================================================"
  echo "== $*"
  echo "================================================================================"
}

fatal_install() {
  echo "run-all: cannot continue: $*" >&2
  echo "steps: 0 passed, 1 failed"
  exit 1
}

# ---- installers (idempotent) -----------------------------------------------------------------

APT_UPDATED=0
# ensure_debian_packages COMMAND:PACKAGE ...
# Installs PACKAGE with apt-get when COMMAND is not on PATH and the package is not installed.
ensure_debian_packages() {
  local missing=() pair cmd pkg
  for pair in "$@"; do
    cmd="${pair%%:*}"
    pkg="${pair#*:}"
    if command -v "$cmd" >/dev/null 2>&1; then
      continue
    fi
    if dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed"; then
      continue
    fi
    missing+=("$pkg")
  done
  ((${#missing[@]} == 0)) && return 0
  local how="apt-get update && apt-get install -y ${missing[*]}"
  if [[ "$(id -u)" != 0 ]]; then
    fatal_install "missing Debian packages: ${missing[*]}; install them as root: $how"
  fi
  echo "run-all: installing Debian packages: ${missing[*]}"
  if [[ "$APT_UPDATED" == 0 ]]; then
    DEBIAN_FRONTEND=noninteractive apt-get update -q </dev/null ||
      fatal_install "apt-get update failed; then install by hand: $how"
    APT_UPDATED=1
  fi
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}" </dev/null ||
    fatal_install "apt-get install failed for ${missing[*]}; install by hand: $how"
}

# Node.js for tests/node_client.rs (the rooms guide's JavaScript client, run unchanged). Node 20
# and later have a WebSocket of their own (20/21 behind a flag the test passes); older ones
# (Debian 12 ships 18) get the `ws` package from npm, cached, on NODE_PATH.
ensure_node() {
  ensure_debian_packages node:nodejs
  local major
  major="$(node --version | sed 's/^v//; s/\..*//')"
  if ((major >= 20)); then
    return 0
  fi
  local dir="$HOME/.cache/switchboard/node-ws-8"
  if [[ ! -f "$dir/node_modules/ws/package.json" ]]; then
    ensure_debian_packages npm:npm
    echo "run-all: installing the ws package (Node $major has no WebSocket) into $dir"
    npm install --prefix "$dir" --no-save --no-audit --no-fund ws@8 </dev/null ||
      fatal_install "npm install ws@8 failed; install by hand: npm install --prefix $dir ws@8"
  fi
  export NODE_PATH="$dir/node_modules${NODE_PATH:+:$NODE_PATH}"
}

# redis-server and redis-cli for the Redis tests: tests/common/redis.rs starts its own servers
# (and, with `redis-cli --cluster create`, a Redis Cluster) on free loopback ports and fails,
# never skips, without them. Debian's redis-server depends on redis-tools, which has redis-cli;
# both are named, so a machine with only one of them gets the other. Installing the package may
# also start Debian's own redis-server on port 6379; the tests do not use it.
ensure_redis_server() {
  ensure_debian_packages redis-server:redis-server redis-cli:redis-tools openssl:openssl
  local server cli
  server="$(command -v redis-server)" ||
    fatal_install "redis-server not on PATH even with the redis-server package; install by hand: apt-get update && apt-get install -y redis-server redis-tools"
  cli="$(command -v redis-cli)" ||
    fatal_install "redis-cli not on PATH even with the redis-tools package; install by hand: apt-get update && apt-get install -y redis-tools"
  # The tests look here first (tests/common/redis.rs).
  export SWITCHBOARD_TEST_REDIS_SERVER="$server"
  export SWITCHBOARD_TEST_REDIS_CLI="$cli"
  echo "run-all: Redis for the cluster tests: $("$server" --version) ($server); $("$cli" --version) ($cli)"
}

# PostgreSQL server binaries for the message store tests: tests/common/pg.rs initdb's a
# throwaway cluster from them (as the `postgres` user when run as root) and fails, never skips,
# without them. Debian keeps initdb and pg_ctl in /usr/lib/postgresql/<version>/bin, off PATH.
# Installing the package may also start Debian's default cluster on port 5432; the tests do not
# use it.
find_pg_bindir() {
  local d
  if command -v initdb >/dev/null 2>&1 && command -v pg_ctl >/dev/null 2>&1; then
    dirname "$(readlink -f "$(command -v initdb)")"
    return 0
  fi
  for d in $(printf '%s\n' /usr/lib/postgresql/*/bin | sort -V -r); do
    if [[ -x "$d/initdb" && -x "$d/pg_ctl" ]]; then
      echo "$d"
      return 0
    fi
  done
  return 1
}

ensure_postgresql() {
  local dir
  if ! dir="$(find_pg_bindir)"; then
    ensure_debian_packages initdb:postgresql
    dir="$(find_pg_bindir)" ||
      fatal_install "PostgreSQL server binaries (initdb, pg_ctl) not found even with the postgresql package; install by hand: apt-get update && apt-get install -y postgresql"
  fi
  # The tests look here first (tests/common/pg.rs).
  export SWITCHBOARD_TEST_PG_BIN="$dir"
  echo "run-all: PostgreSQL for the store tests: $("$dir/postgres" --version) ($dir)"
}

# The tansu Kafka-protocol broker for the Kafka tests (tests/common/kafka.rs runs it; a test
# fails, never skips, without it). Not packaged by Debian: built with cargo into a cache root
# outside the work tree, $HOME/.cache/switchboard/tansu-$TANSU_VERSION, so a clean clone (CI)
# reuses a binary built by an earlier run. The build has its own CARGO_TARGET_DIR under that
# root (never the project's: a different feature set would rebuild shared crates), removed
# after a successful install (several GB; a failed build keeps it, so a retry resumes).
TANSU_VERSION=0.6.0
TANSU_INSTALL_TIME_LIMIT_SECS=3600
# Headless Chromium for the admin page's browser test (tests/admin_page.rs).
ensure_chromium() {
  if [[ -n "${SWITCHBOARD_TEST_CHROMIUM:-}" ]]; then
    [[ -x "$SWITCHBOARD_TEST_CHROMIUM" ]] ||
      fatal_install "SWITCHBOARD_TEST_CHROMIUM=$SWITCHBOARD_TEST_CHROMIUM is not an executable"
  else
    ensure_debian_packages chromium:chromium
    command -v chromium >/dev/null ||
      fatal_install "chromium not on PATH even with the chromium package; install by hand: apt-get update && apt-get install -y chromium"
    export SWITCHBOARD_TEST_CHROMIUM="$(command -v chromium)"
  fi
  echo "run-all: Chromium for the admin page test: $("$SWITCHBOARD_TEST_CHROMIUM" --version 2>/dev/null | head -n 1) ($SWITCHBOARD_TEST_CHROMIUM)"
}

ensure_tansu() {
  local root="$HOME/.cache/switchboard/tansu-$TANSU_VERSION"
  local bin="$root/bin/tansu"
  if [[ ! -x "$bin" ]]; then
    local how="cargo install tansu --version $TANSU_VERSION --locked --features dynostore,postgres --root $root"
    echo "run-all: installing tansu $TANSU_VERSION into $root (a cold build takes about 15 minutes on 2 cores; later runs reuse it): $how"
    mkdir -p "$root" || fatal_install "cannot create $root"
    local build_dir="$root/build"
    CARGO_TARGET_DIR="$build_dir" timeout --kill-after="$KILL_AFTER_SECS" "$TANSU_INSTALL_TIME_LIMIT_SECS" \
      cargo install tansu --version "$TANSU_VERSION" --locked --features dynostore,postgres --root "$root" </dev/null ||
      fatal_install "installing tansu failed (see above); retry by hand: $how"
    [[ -x "$bin" ]] || fatal_install "cargo install tansu succeeded but $bin is missing; retry by hand: $how"
    rm -rf "$build_dir"
  fi
  # The tests look here first (tests/common/kafka.rs).
  export SWITCHBOARD_TEST_TANSU="$bin"
  echo "run-all: tansu for the Kafka tests: $("$bin" --version 2>&1 | head -n 1) ($bin)"
}

section "setup: tools and packages"
command -v cargo >/dev/null ||
  fatal_install "cargo not found: install the Rust toolchain (rustup) and put ~/.cargo/bin on PATH"
cargo fmt --version >/dev/null 2>&1 ||
  fatal_install "rustfmt not found: rustup component add rustfmt"
cargo clippy --version >/dev/null 2>&1 ||
  fatal_install "clippy not found: rustup component add clippy"
echo "run-all: $(cargo --version); $(rustc --version)"

# >>> Debian packages the tests need: add COMMAND:PACKAGE pairs here. None yet. <<<
DEBIAN_NEEDS=()
ensure_debian_packages "${DEBIAN_NEEDS[@]}"
# python3 runs compare.py and creates the kosoku venv.
ensure_debian_packages python3:python3
ensure_postgresql
ensure_redis_server
ensure_tansu
ensure_node
ensure_chromium

bash tests/autobahn/run.sh --install-only ||
  fatal_install "kosoku (Autobahn client) could not be installed; see the message above"

# ---- steps ----------------------------------------------------------------------------------

# run_step NAME TIME_LIMIT_SECS COMMAND...: runs COMMAND with errexit in a subshell, records
# the result. Never exits the script.
run_step() {
  local name="$1" limit="$2"
  shift 2
  section "$name"
  local start=$SECONDS rc
  set +e
  (
    set -euo pipefail
    "$@"
  )
  rc=$?
  set -e
  local took=$((SECONDS - start))
  if ((rc == 0)); then
    STEP_RESULTS+=("ok")
    echo "-- $name: ok (${took}s)"
  else
    if ((rc == 124 || rc == 137)); then
      STEP_RESULTS+=("FAILED (over its ${limit}s limit)")
    else
      STEP_RESULTS+=("FAILED (exit $rc)")
    fi
    echo "-- $name: ${STEP_RESULTS[-1]} (${took}s)" >&2
  fi
  STEP_NAMES+=("$name")
  STEP_SECS+=("$took")
  return 0
}

skip_step() {
  section "$1"
  echo "-- $1: NOT RUN: $2" >&2
  STEP_NAMES+=("$1")
  STEP_RESULTS+=("FAILED (not run: $2)")
  STEP_SECS+=(0)
}

limited() {
  local limit="$1"
  shift
  timeout --kill-after="$KILL_AFTER_SECS" "$limit" "$@"
}

step_fmt() {
  limited "$FMT_TIME_LIMIT_SECS" cargo fmt --all -- --check
}

step_clippy() {
  limited "$CLIPPY_TIME_LIMIT_SECS" cargo clippy --workspace --all-targets -- -D warnings
}

TEST_LOG="$LOG_DIR/cargo-test.log"
step_test() {
  # --no-fail-fast: one failing test binary must not hide the others' results.
  limited "$TEST_TIME_LIMIT_SECS" cargo test --workspace --no-fail-fast 2>&1 | tee "$TEST_LOG"
  # A test command that ran nothing is a broken test command.
  local total
  total="$(sed -nE 's/^test result: [a-zA-Z]+\. ([0-9]+) passed; ([0-9]+) failed.*/\1 \2/p' "$TEST_LOG" |
    awk '{ n += $1 + $2 } END { print n + 0 }')"
  if ((total == 0)); then
    echo "run-all: cargo test ran no test" >&2
    return 1
  fi
}

step_unittest() {
  limited "$UNITTEST_TIME_LIMIT_SECS" python3 -m unittest -v tests/autobahn/test_compare.py
}

step_build() {
  limited "$BUILD_TIME_LIMIT_SECS" cargo build --release --bin switchboard
}

step_autobahn() {
  limited "$AUTOBAHN_STEP_TIME_LIMIT_SECS" bash tests/autobahn/run.sh "$TARGET_DIR/release/switchboard"
}

# Whether this kernel refuses the io_uring backend: the release binary's doctor says (its
# "I/O backend" finding), and this prints that line.
io_uring_refused() {
  SWITCHBOARD_IO_BACKEND=io_uring "$TARGET_DIR/release/switchboard" doctor 2>&1 |
    grep -E "I/O backend.*refused" || return 1
}

EPOLL_TEST_LOG="$LOG_DIR/cargo-test-epoll.log"
step_test_epoll() {
  SB_TEST_IO_BACKEND=epoll limited "$TEST_TIME_LIMIT_SECS" \
    cargo test -p switchboard --no-fail-fast --test '*' 2>&1 | tee "$EPOLL_TEST_LOG"
}

step_autobahn_epoll() {
  AUTOBAHN_IO_BACKEND=epoll limited "$AUTOBAHN_STEP_TIME_LIMIT_SECS" \
    bash tests/autobahn/run.sh "$TARGET_DIR/release/switchboard"
}

run_step "cargo fmt --check" "$FMT_TIME_LIMIT_SECS" step_fmt
run_step "cargo clippy -D warnings" "$CLIPPY_TIME_LIMIT_SECS" step_clippy
run_step "cargo test --workspace" "$TEST_TIME_LIMIT_SECS" step_test
run_step "autobahn judge unit tests" "$UNITTEST_TIME_LIMIT_SECS" step_unittest
run_step "cargo build --release" "$BUILD_TIME_LIMIT_SECS" step_build
if [[ "${STEP_RESULTS[-1]}" == "ok" ]]; then
  run_step "autobahn conformance" "$AUTOBAHN_STEP_TIME_LIMIT_SECS" step_autobahn
else
  skip_step "autobahn conformance" "the release build failed"
fi
run_step "integration tests, epoll" "$TEST_TIME_LIMIT_SECS" step_test_epoll
if [[ -x "$TARGET_DIR/release/switchboard" ]]; then
  run_step "autobahn conformance, epoll" "$AUTOBAHN_STEP_TIME_LIMIT_SECS" step_autobahn_epoll
  if why="$(io_uring_refused)"; then
    if [[ "${SB_REQUIRE_IO_URING:-}" == "1" ]]; then
      skip_step "io_uring (the default backend)" "required (SB_REQUIRE_IO_URING=1) but refused: $why"
    else
      section "io_uring"
      echo "run-all: this kernel refuses io_uring, so steps 3 and 6 ran on epoll too: $why" >&2
      echo "run-all: (set SB_REQUIRE_IO_URING=1 to make that a failure)" >&2
    fi
  fi
else
  skip_step "autobahn conformance, epoll" "the release build failed"
fi

# ---- summary --------------------------------------------------------------------------------

section "summary"
passed=0
failed=0
for i in "${!STEP_NAMES[@]}"; do
  printf '  %-28s %-44s %5ss\n' "${STEP_NAMES[$i]}" "${STEP_RESULTS[$i]}" "${STEP_SECS[$i]}"
  if [[ "${STEP_RESULTS[$i]}" == "ok" ]]; then
    passed=$((passed + 1))
  else
    failed=$((failed + 1))
  fi
done
if [[ -f "$TEST_LOG" ]]; then
  sed -nE 's/^test result: [a-zA-Z]+\. ([0-9]+) passed; ([0-9]+) failed; ([0-9]+) ignored.*/\1 \2 \3/p' "$TEST_LOG" |
    awk '{ p += $1; f += $2; i += $3 } END { printf "  cargo test totals: %d passed, %d failed, %d ignored\n", p, f, i }'
  ignored="$(grep -E '^test .* \.\.\. ignored' "$TEST_LOG" | sed -E 's/^test (.*) \.\.\. ignored.*/\1/' || true)"
  if [[ -n "$ignored" ]]; then
    echo "  ignored tests (not run by cargo test; run with -- --ignored):"
    while IFS= read -r name; do echo "    $name"; done <<<"$ignored"
  fi
fi
if [[ -f "$EPOLL_TEST_LOG" ]]; then
  sed -nE 's/^test result: [a-zA-Z]+\. ([0-9]+) passed; ([0-9]+) failed; ([0-9]+) ignored.*/\1 \2 \3/p' "$EPOLL_TEST_LOG" |
    awk '{ p += $1; f += $2; i += $3 } END { printf "  integration tests on epoll: %d passed, %d failed, %d ignored\n", p, f, i }'
fi
for dir in autobahn autobahn-epoll; do
  if [[ -f "$TARGET_DIR/$dir/results.json" ]]; then
    python3 - "$TARGET_DIR/$dir/results.json" "$dir" <<'EOF'
import collections, json, sys
cases = json.load(open(sys.argv[1], encoding="utf-8"))["cases"]
c = collections.Counter(v["behavior"] for v in cases.values())
label = "autobahn cases" + (" on epoll" if sys.argv[2].endswith("epoll") else "")
print(f"  {label}: " + ", ".join(f"{n} {k}" for k, n in sorted(c.items())) + f" (of {len(cases)})")
EOF
  fi
done
echo "  total time: $((SECONDS - RUN_START))s"
echo "steps: $passed passed, $failed failed"
((failed == 0))
