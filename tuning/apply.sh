#!/usr/bin/env bash
# apply.sh -- apply the shardmq 1M-connection host tuning. Needs root (except --dry-run).
#
#   1. writes every knob of sysctl.d/90-shardmq.conf that check.sh would flag to /proc/sys (in file order:
#      fs.nr_open before limits; a floor already exceeded, e.g. a larger fs.file-max, is left alone) and installs the file as /etc/sysctl.d/90-shardmq.conf so it survives a reboot;
#   2. installs limits.d/90-shardmq.conf as /etc/security/limits.d/90-shardmq.conf;
#   3. with --install-unit, and only if systemd is running: creates the system user shardmq if missing,
#      installs shardmq.service to /etc/systemd/system/ and runs `systemctl daemon-reload`
#      (it does not enable or start the broker).
# Reports "applied" / "could not apply: <error>" per step (read-only /proc/sys in a container is the usual
# failure), prints a summary, and exits 1 if anything failed.
#
# Usage: tuning/apply.sh [--dry-run] [--install-unit] [--no-persist] [-h]
#   --dry-run       print what would be done, change nothing (works without root)
#   --install-unit  also install the systemd unit (and the shardmq user)
#   --no-persist    only set the running kernel; do not install files under /etc
set -u

TUNING_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source-path=SCRIPTDIR source=lib.sh
. "$TUNING_DIR/lib.sh"

ETC=${ETC:-/etc}
DRY_RUN=0 INSTALL_UNIT=0 PERSIST=1
for arg in "$@"; do
    case $arg in
        --dry-run) DRY_RUN=1 ;;
        --install-unit) INSTALL_UNIT=1 ;;
        --no-persist) PERSIST=0 ;;
        -h|--help) sed -n '2,18p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "apply.sh: unknown option: $arg (see --help)" >&2; exit 2 ;;
    esac
done

if (( ! DRY_RUN )) && (( EUID != 0 )); then
    echo "apply.sh: must run as root to change kernel settings and install files under $ETC." >&2
    echo "          Re-run with sudo, or use --dry-run to see what would change (tuning/check.sh is read-only)." >&2
    exit 2
fi

parse_sysctl_file "$SYSCTL_FILE" || exit 2

applied=0 failed=0 skipped=0 unchanged=0 unwritable=0
FAILURES=()
(( DRY_RUN )) && echo "== dry run: nothing will be changed"

report() { # STATUS WHAT [DETAIL]
    printf '%-18s %-36s %s\n' "$1" "$2" "${3:-}"
}
fail() { # WHAT ERROR
    report "COULD NOT APPLY" "$1" "$2"
    failed=$((failed + 1))
    FAILURES+=("$1: $2")
}

echo "== sysctls (running kernel)"
for i in "${!KNOB_KEYS[@]}"; do
    key=${KNOB_KEYS[i]} value=${KNOB_VALUES[i]} optional=${KNOB_OPTIONAL[i]}
    path=$(knob_path "$key")
    if ! cur=$(read_knob "$key"); then
        if (( optional )); then
            report "skipped" "$key" "not present (optional: module not loaded)"
            skipped=$((skipped + 1))
        else
            fail "$key" "not present on this kernel ($path)"
        fi
        continue
    fi
    if [[ $cur == "$value" ]]; then
        report "already set" "$key" "$value"
        unchanged=$((unchanged + 1))
        continue
    fi
    # A floor that is already exceeded (or a ceiling already undercut) is left alone: never lower file-max.
    if [[ $(compare "$cur" "$value" "${KNOB_MODES[i]}") == OK ]]; then
        report "already ok" "$key" "$cur (recommended $value, ${KNOB_MODES[i]}): left as is"
        unchanged=$((unchanged + 1))
        continue
    fi
    if (( DRY_RUN )); then
        if [[ -w $path ]]; then
            report "would apply" "$key" "$cur -> $value"
        else
            report "would apply" "$key" "$cur -> $value (read-only here: would fail)"
            unwritable=$((unwritable + 1))
        fi
        continue
    fi
    if ! err=$( { printf '%s\n' "$value" > "$path"; } 2>&1 ); then
        err=${err##*: }
        fail "$key" "${err:-write failed} (wanted $value, still $cur)"
        continue
    fi
    now=$(read_knob "$key") || now="?"
    if [[ $now == "$value" ]]; then
        report "applied" "$key" "$cur -> $value"
        applied=$((applied + 1))
    else
        fail "$key" "kernel kept $now after writing $value"
    fi
done

# install_file SRC DEST -- copy with mode 0644, reporting like the knobs.
install_file() {
    local src=$1 dest=$2 err
    if [[ -f $dest ]] && cmp -s "$src" "$dest"; then
        report "already set" "$dest" "identical"
        unchanged=$((unchanged + 1))
        return 0
    fi
    if (( DRY_RUN )); then
        report "would install" "$dest" "from ${src#"$TUNING_DIR"/}"
        return 0
    fi
    if err=$(install -D -m 0644 "$src" "$dest" 2>&1); then
        report "applied" "$dest" "installed"
        applied=$((applied + 1))
    else
        fail "$dest" "$err"
        return 1
    fi
}

echo "== files"
if (( PERSIST )); then
    install_file "$SYSCTL_FILE" "$ETC/sysctl.d/90-shardmq.conf"
    install_file "$LIMITS_FILE" "$ETC/security/limits.d/90-shardmq.conf"
else
    report "skipped" "persistent files" "--no-persist"
    skipped=$((skipped + 1))
fi

if (( INSTALL_UNIT )); then
    echo "== systemd unit"
    if [[ ! -d /run/systemd/system ]] || ! command -v systemctl >/dev/null 2>&1; then
        fail "shardmq.service" "systemd is not running on this host (no /run/systemd/system)"
    else
        if id shardmq >/dev/null 2>&1; then
            report "already set" "user shardmq" "exists"
            unchanged=$((unchanged + 1))
        elif (( DRY_RUN )); then
            report "would apply" "user shardmq" "useradd --system --no-create-home --shell /usr/sbin/nologin shardmq"
        elif err=$(useradd --system --no-create-home --shell /usr/sbin/nologin shardmq 2>&1); then
            report "applied" "user shardmq" "created"
            applied=$((applied + 1))
        else
            fail "user shardmq" "$err"
        fi
        if install_file "$UNIT_FILE" "$ETC/systemd/system/shardmq.service" && (( ! DRY_RUN )); then
            if err=$(systemctl daemon-reload 2>&1); then
                report "applied" "systemctl daemon-reload" ""
            else
                fail "systemctl daemon-reload" "$err"
            fi
        fi
        [[ -x /usr/local/bin/shardmq ]] ||
            report "note" "/usr/local/bin/shardmq" "missing: install the binary before starting the unit"
    fi
fi

echo
if (( DRY_RUN )); then
    echo "dry run: nothing changed ($unchanged already set, $skipped skipped, $failed would fail," \
        "$unwritable read-only here)"
else
    echo "summary: $applied applied, $unchanged already set, $skipped skipped, $failed could not apply"
fi
if (( failed )); then
    echo "could not apply:"
    printf '  %s\n' "${FAILURES[@]}"
    exit 1
fi
if (( ! DRY_RUN )); then
    echo "next: tuning/check.sh; new logins pick up the limits file; (re)start the broker to get the new limits"
    (( INSTALL_UNIT )) && echo "      systemctl enable --now shardmq && journalctl -u shardmq | grep runtime="
fi
exit 0
