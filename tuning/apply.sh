#!/usr/bin/env bash
# Apply Switchboard's kernel and fd-limit tuning to this host, then verify it.
#
#   tuning/apply.sh [--dry-run] [--with-systemd] [--connections N] [--bin PATH]
#
# 1. Builds the effective sysctl file from tuning/sysctl.d/99-switchboard.conf: capacity keys
#    are floors (a larger value already in force is kept), other keys are set as written.
#    Installs it as /etc/sysctl.d/99-switchboard.conf (only when it changed) and loads it.
# 2. Installs tuning/limits.d/switchboard.conf as /etc/security/limits.d/switchboard.conf.
# 3. With --with-systemd: installs tuning/systemd/switchboard.service and runs daemon-reload
#    (it never starts or restarts the service).
# 4. Verifies: reads every key back and compares, then runs
#    `prlimit --nofile=L:L -- switchboard doctor --connections N` with L the unit's LimitNOFILE,
#    i.e. the limits the service will see.
#
# --dry-run prints what would change and the commands, runs doctor read-only, needs no root and
# writes nothing. Running it twice is harmless: unchanged files are not rewritten.
# Exit: 0 applied and nothing blocks N; 1 a key did not read back or doctor found a blocker;
# 2 usage error or not root.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
src_sysctl=$here/sysctl.d/99-switchboard.conf
dst_sysctl=/etc/sysctl.d/99-switchboard.conf
src_limits=$here/limits.d/switchboard.conf
dst_limits=/etc/security/limits.d/switchboard.conf
src_unit=$here/systemd/switchboard.service
dst_unit=/etc/systemd/system/switchboard.service
# Keys whose value is a capacity: never lower what the machine already has.
floor_keys=" fs.file-max fs.nr_open net.core.somaxconn net.ipv4.tcp_max_syn_backlog \
net.core.netdev_max_backlog net.ipv4.tcp_max_orphans net.ipv4.tcp_max_tw_buckets \
net.netfilter.nf_conntrack_max net.ipv4.tcp_mem "

dry_run=0
with_systemd=0
connections=100000
bin=""

usage() {
    sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//' >&2
    exit 2
}

while [ $# -gt 0 ]; do
    case $1 in
    --dry-run) dry_run=1 ;;
    --with-systemd) with_systemd=1 ;;
    --connections)
        [ $# -ge 2 ] || usage
        connections=$2
        shift
        ;;
    --bin)
        [ $# -ge 2 ] || usage
        bin=$2
        shift
        ;;
    -h | --help) usage ;;
    *)
        echo "apply.sh: unknown argument '$1'" >&2
        usage
        ;;
    esac
    shift
done
case $connections in
'' | *[!0-9]*)
    echo "apply.sh: --connections must be a positive integer" >&2
    exit 2
    ;;
esac
if [ "$dry_run" = 0 ] && [ "$(id -u)" != 0 ]; then
    echo "apply.sh: must run as root (or use --dry-run)" >&2
    exit 2
fi

say() { printf '%s\n' "$*"; }
run() {
    if [ "$dry_run" = 1 ]; then
        say "would run: $*"
    else
        say "+ $*"
        "$@"
    fi
}

# Whether a sysctl key exists on this kernel (module keys vanish when the module is unloaded).
exists() { [ -r "/proc/sys/${1//.//}" ]; }

# Current value of an existing sysctl key with whitespace squeezed.
current() {
    tr -s ' \t' '  ' <"/proc/sys/${1//.//}" | sed 's/^ *//; s/ *$//'
}

# Element-wise maximum of two whitespace-separated number lists of equal length.
max_each() {
    local -a a b
    read -r -a a <<<"$1"
    read -r -a b <<<"$2"
    if [ "${#a[@]}" != "${#b[@]}" ]; then
        printf '%s' "$2"
        return
    fi
    local i out=""
    for i in "${!a[@]}"; do
        if [ "${a[$i]}" -gt "${b[$i]}" ]; then out+="${a[$i]} "; else out+="${b[$i]} "; fi
    done
    printf '%s' "${out% }"
}

# --- 1. the effective sysctl file --------------------------------------------------------
effective=$(mktemp)
trap 'rm -f "$effective"' EXIT
declare -a keys=()
declare -A want=()
while IFS= read -r line || [ -n "$line" ]; do
    case $line in
    '' | '#'*)
        printf '%s\n' "$line" >>"$effective"
        continue
        ;;
    esac
    prefix=""
    entry=$line
    if [ "${entry:0:1}" = "-" ]; then
        prefix="-"
        entry=${entry:1}
    fi
    key=$(printf '%s' "${entry%%=*}" | tr -d ' \t')
    value=$(printf '%s' "${entry#*=}" | tr -s ' \t' '  ' | sed 's/^ *//; s/ *$//')
    if ! exists "$key"; then
        printf '%s%s = %s\n' "$prefix" "$key" "$value" >>"$effective"
        say "skip  $key: not on this kernel (module not loaded?)"
        continue
    fi
    cur=$(current "$key")
    if [[ $floor_keys == *" $key "* ]]; then
        value=$(max_each "$cur" "$value")
    fi
    printf '%s%s = %s\n' "$prefix" "$key" "$value" >>"$effective"
    keys+=("$key")
    want[$key]=$value
    if [ "$cur" = "$value" ]; then
        say "ok    $key = $value"
    else
        say "set   $key: $cur -> $value"
    fi
done <"$src_sysctl"

# Install a file only when its content differs (idempotent).
install_file() {
    local src=$1 dst=$2 mode=$3
    if [ -f "$dst" ] && cmp -s "$src" "$dst"; then
        say "unchanged $dst"
        return 1
    fi
    run install -D -m "$mode" "$src" "$dst"
    return 0
}

say ""
install_file "$effective" "$dst_sysctl" 0644 || true
# -e: skip keys of modules that are not loaded (also marked with a leading '-').
run sysctl -e -q -p "$dst_sysctl"
install_file "$src_limits" "$dst_limits" 0644 || true
if [ "$with_systemd" = 1 ]; then
    if install_file "$src_unit" "$dst_unit" 0644; then
        run systemctl daemon-reload
    fi
fi

# --- 4. verify ------------------------------------------------------------------------------
status=0
if [ "$dry_run" = 0 ]; then
    say ""
    for key in "${keys[@]}"; do
        got=$(current "$key")
        if [ "$got" != "${want[$key]}" ]; then
            say "MISMATCH $key: wanted '${want[$key]}', reads back '$got'"
            status=1
        fi
    done
    [ "$status" = 0 ] && say "read back: all ${#keys[@]} keys as wanted"
fi

nofile=$(sed -n 's/^LimitNOFILE=\([0-9]*\).*/\1/p' "$src_unit")
if [ -z "$bin" ]; then
    for c in "$(command -v switchboard || true)" "$here/../target/release/switchboard" \
        "$here/../target/debug/switchboard"; do
        if [ -n "$c" ] && [ -x "$c" ]; then
            bin=$c
            break
        fi
    done
fi
say ""
if [ -z "$bin" ] || [ ! -x "$bin" ]; then
    say "switchboard binary not found (use --bin PATH): doctor not run"
    [ "$dry_run" = 1 ] || status=1
    exit "$status"
fi
if [ "$dry_run" = 1 ]; then
    say "would run: prlimit --nofile=$nofile:$nofile -- $bin doctor --connections $connections"
    say "current state of this shell (read-only):"
    "$bin" doctor --connections "$connections" || true
    exit 0
fi
if prlimit --nofile="$nofile:$nofile" -- true 2>/dev/null; then
    say "+ prlimit --nofile=$nofile:$nofile -- $bin doctor --connections $connections"
    prlimit --nofile="$nofile:$nofile" -- "$bin" doctor --connections "$connections" || status=1
else
    # Containers without CAP_SYS_RESOURCE cannot raise a hard limit even as root.
    say "cannot raise RLIMIT_NOFILE to $nofile here (no CAP_SYS_RESOURCE, or fs.nr_open lower):"
    say "+ $bin doctor --connections $connections   # with this shell's fd limits"
    "$bin" doctor --connections "$connections" || status=1
fi
exit "$status"
