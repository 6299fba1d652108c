#!/usr/bin/env bash
# check.sh -- read-only check of a host against the shardmq 1M-connection tuning. Changes nothing.
#
# Reads every knob in sysctl.d/90-shardmq.conf (the recommended values come from that file) from /proc/sys,
# plus `ulimit -n`, `ulimit -l` and the installed shardmq.service's LimitNOFILE, and prints
#   knob  current  recommended  OK | LOW | HIGH | MISSING
# with a one-line hint under the table for every bad one.
#
# Exit status: 0 everything fine (MISSING knobs, e.g. nf_conntrack not loaded, are fine); 1 at least one knob
# is on the wrong side of its recommendation; 2 usage error or unreadable sysctl file.
#
# Usage: tuning/check.sh [-h]      (env SYSCTL_FILE, LIMITS_FILE, PROC_SYS override the defaults, for tests)
set -u

TUNING_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source-path=SCRIPTDIR source=lib.sh
. "$TUNING_DIR/lib.sh"

case ${1:-} in
    "") ;;
    -h|--help) sed -n '2,13p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "usage: $0 [-h]" >&2; exit 2 ;;
esac

parse_sysctl_file "$SYSCTL_FILE" || exit 2

bad=0 missing=0 ok=0
HINTS=()

line() { printf '%-36s %-24s %-24s %s\n' "$@"; }

# row KNOB CURRENT RECOMMENDED STATUS HINT [COUNTED]
row() {
    local counted=${6:-1}
    line "$1" "$2" "$3" "$4"
    case $4 in
        OK) ok=$((ok + 1)) ;;
        MISSING) missing=$((missing + 1)); HINTS+=("$1: not present on this host (${5})") ;;
        *)
            if (( counted )); then
                bad=$((bad + 1))
                HINTS+=("$1: $5")
            else
                HINTS+=("$1: $5 [informational, not counted]")
            fi
            ;;
    esac
}

line KNOB CURRENT RECOMMENDED STATUS
line "----" "-------" "-----------" "------"

for i in "${!KNOB_KEYS[@]}"; do
    key=${KNOB_KEYS[i]} rec=${KNOB_VALUES[i]} modes=${KNOB_MODES[i]} hint=${KNOB_HINTS[i]}
    if cur=$(read_knob "$key"); then
        status=$(compare "$cur" "$rec" "$modes")
        row "$key" "$cur" "$rec" "$status" "$hint"
    else
        why="no $(knob_path "$key")"
        [[ $key == net.netfilter.* ]] && why="nf_conntrack not loaded: nothing to size (or NOTRACK the port)"
        [[ $key == kernel.io_uring_disabled ]] && why="kernel < 6.6: io_uring is always allowed"
        row "$key" "-" "$rec" MISSING "$why"
    fi
done

# --- process limits -----------------------------------------------------------------------------------------
rec_nofile=$(limits_value nofile) || rec_nofile=1100000
rec_memlock=$(limits_value memlock) || rec_memlock=unlimited

# The installed unit's LimitNOFILE: from systemd when it runs, else from the unit file on disk.
unit_nofile="" unit_where=""
if command -v systemctl >/dev/null 2>&1 && [[ -d /run/systemd/system ]] &&
    [[ $(systemctl show -p LoadState --value shardmq.service 2>/dev/null) == loaded ]]; then
    unit_nofile=$(systemctl show -p LimitNOFILE --value shardmq.service 2>/dev/null)
    unit_where="systemd"
else
    for f in /etc/systemd/system/shardmq.service /usr/lib/systemd/system/shardmq.service \
        /lib/systemd/system/shardmq.service; do
        if [[ -r $f ]]; then
            unit_nofile=$(sed -n 's/^[[:space:]]*LimitNOFILE[[:space:]]*=[[:space:]]*\([^:[:space:]]*\).*/\1/p' "$f" | tail -n 1)
            unit_where=$f
            break
        fi
    done
fi

# This shell's nofile limit only matters when the broker is started from a shell; with the unit installed
# the unit's LimitNOFILE is what the broker gets, so then the shell's value is informational.
shell_nofile=$(ulimit -n)
shell_counted=1
[[ -n $unit_where ]] && shell_counted=0
row "ulimit -n (this shell)" "$shell_nofile" "$rec_nofile" "$(compare "$shell_nofile" "$rec_nofile" min)" \
    "ulimit -n $rec_nofile (needs fs.nr_open >= $rec_nofile); for logins install limits.d/90-shardmq.conf" \
    "$shell_counted"

# memlock only limits io_uring on kernels before 5.12 (later ones account to the memory cgroup).
shell_memlock=$(ulimit -l)
kver=$(uname -r)
kmaj=${kver%%.*} kmin=${kver#*.}
kmin=${kmin%%[!0-9]*}
memlock_counted=1
if [[ $kmaj =~ ^[0-9]+$ && $kmin =~ ^[0-9]+$ ]] && (( kmaj > 5 || (kmaj == 5 && kmin >= 12) )); then
    memlock_counted=0
fi
row "ulimit -l (this shell)" "$shell_memlock" "$rec_memlock" "$(compare "$shell_memlock" "$rec_memlock" min)" \
    "ulimit -l $rec_memlock / LimitMEMLOCK=infinity (io_uring rings count against memlock on kernel < 5.12; this is $kver)" \
    "$memlock_counted"

if [[ -n $unit_where ]]; then
    row "shardmq.service LimitNOFILE" "${unit_nofile:-unset}" "$rec_nofile" \
        "$(compare "${unit_nofile:-0}" "$rec_nofile" min)" \
        "set LimitNOFILE=$rec_nofile in the unit ($unit_where), then systemctl daemon-reload && systemctl restart shardmq"
else
    row "shardmq.service LimitNOFILE" "-" "$rec_nofile" MISSING \
        "unit not installed: tuning/apply.sh --install-unit"
fi

echo
if (( ${#HINTS[@]} )); then
    echo "Hints:"
    printf '  %s\n' "${HINTS[@]}"
    echo
fi
echo "check: $ok OK, $bad to fix, $missing missing (sysctl values from $SYSCTL_FILE)"
if (( bad )); then
    exit 1
fi
exit 0
