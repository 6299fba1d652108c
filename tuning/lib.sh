# shellcheck shell=bash
# Shared by check.sh and apply.sh (sourced, not run): parses sysctl.d/90-shardmq.conf, the single source of
# truth for the recommended values, and compares values against it.

TUNING_DIR=${TUNING_DIR:-$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)}
SYSCTL_FILE=${SYSCTL_FILE:-$TUNING_DIR/sysctl.d/90-shardmq.conf}
LIMITS_FILE=${LIMITS_FILE:-$TUNING_DIR/limits.d/90-shardmq.conf}
UNIT_FILE=${UNIT_FILE:-$TUNING_DIR/shardmq.service}
PROC_SYS=${PROC_SYS:-/proc/sys}

# Filled by parse_sysctl_file, one entry per knob, in file order.
KNOB_KEYS=()      # net.core.somaxconn
KNOB_VALUES=()    # "65535" or "4096 16384 4194304" (fields separated by one space)
KNOB_MODES=()     # "min" / "max min" / "max=1" ... (one per field; missing ones default to min)
KNOB_HINTS=()     # one-line fix
KNOB_OPTIONAL=()  # 1 when the line starts with "-" (may be absent / may fail)

# parse_sysctl_file [FILE] -- returns 1 (with a message) when the file is missing or has no knobs.
parse_sysctl_file() {
    local file=${1:-$SYSCTL_FILE} line key value mode="" hint="" optional
    KNOB_KEYS=() KNOB_VALUES=() KNOB_MODES=() KNOB_HINTS=() KNOB_OPTIONAL=()
    if [[ ! -r $file ]]; then
        echo "error: cannot read $file" >&2
        return 1
    fi
    while IFS= read -r line || [[ -n $line ]]; do
        line=${line%$'\r'}
        if [[ $line =~ ^[[:space:]]*#[[:space:]]*check:[[:space:]]*(.*[^[:space:]])[[:space:]]*$ ]]; then
            mode=${BASH_REMATCH[1]}
        elif [[ $line =~ ^[[:space:]]*#[[:space:]]*hint:[[:space:]]*(.*[^[:space:]])[[:space:]]*$ ]]; then
            hint=${BASH_REMATCH[1]}
        elif [[ $line =~ ^[[:space:]]*(#|;|$) ]]; then
            continue
        elif [[ $line =~ ^[[:space:]]*(-?)([A-Za-z0-9_./-]+)[[:space:]]*=[[:space:]]*(.*)$ ]]; then
            optional=0
            [[ -n ${BASH_REMATCH[1]} ]] && optional=1
            key=${BASH_REMATCH[2]}
            value=$(normalize "${BASH_REMATCH[3]}")
            KNOB_KEYS+=("$key") KNOB_VALUES+=("$value") KNOB_MODES+=("${mode:-min}")
            KNOB_HINTS+=("${hint:-sysctl -w $key=\"$value\"}") KNOB_OPTIONAL+=("$optional")
            mode="" hint=""
        else
            echo "warning: $file: cannot parse line: $line" >&2
        fi
    done < "$file"
    if (( ${#KNOB_KEYS[@]} == 0 )); then
        echo "error: no knobs found in $file" >&2
        return 1
    fi
}

# normalize STRING -- collapse whitespace (tabs in /proc/sys output, spaces in the file) to single spaces.
normalize() {
    local -a fields
    read -r -a fields <<< "$1"
    printf '%s' "${fields[*]}"
}

# knob_path KEY -- the /proc/sys file of a dotted sysctl key.
knob_path() {
    printf '%s/%s' "$PROC_SYS" "${1//.//}"
}

# read_knob KEY -- prints the normalized current value; returns 1 when the knob does not exist / is unreadable.
read_knob() {
    local path raw
    path=$(knob_path "$1")
    [[ -r $path ]] || return 1
    raw=$(cat "$path" 2>/dev/null) || return 1
    normalize "$raw"
}

# compare CURRENT RECOMMENDED MODES -- prints OK, LOW or HIGH. Field by field; the first bad field decides.
# "unlimited"/"infinity" count as larger than any number.
compare() {
    local -a cur_f rec_f mode_f
    local i m bound c status
    read -r -a cur_f <<< "$1"
    read -r -a rec_f <<< "$2"
    read -r -a mode_f <<< "$3"
    for i in "${!rec_f[@]}"; do
        m=${mode_f[i]:-${mode_f[${#mode_f[@]}-1]:-min}}
        bound=${rec_f[i]}
        if [[ $m == *=* ]]; then
            bound=${m#*=}
            m=${m%%=*}
        fi
        c=${cur_f[i]:-}
        [[ $m == any ]] && continue
        status=$(compare_one "$c" "$bound" "$m")
        if [[ $status != OK ]]; then
            echo "$status"
            return
        fi
    done
    echo OK
}

# compare_one CURRENT BOUND MODE -- one field.
compare_one() {
    local c=$1 b=$2 m=$3
    [[ $c == infinity ]] && c=unlimited
    [[ $b == infinity ]] && b=unlimited
    if [[ -z $c ]]; then
        echo LOW
        return
    fi
    # Non-numeric values (other than unlimited) can only be compared for equality.
    if ! [[ ( $c =~ ^[0-9]+$ || $c == unlimited ) && ( $b =~ ^[0-9]+$ || $b == unlimited ) ]]; then
        if [[ $c == "$b" ]]; then echo OK; else echo LOW; fi
        return
    fi
    local cmp
    if [[ $c == "$b" ]]; then cmp=0
    elif [[ $c == unlimited ]]; then cmp=1
    elif [[ $b == unlimited ]]; then cmp=-1
    elif (( 10#$c < 10#$b )); then cmp=-1
    elif (( 10#$c > 10#$b )); then cmp=1
    else cmp=0
    fi
    case $m in
        min) if (( cmp < 0 )); then echo LOW; else echo OK; fi ;;
        max) if (( cmp > 0 )); then echo HIGH; else echo OK; fi ;;
        eq)  if (( cmp < 0 )); then echo LOW; elif (( cmp > 0 )); then echo HIGH; else echo OK; fi ;;
        *)   echo OK ;;
    esac
}

# limits_value ITEM -- the hard value of ITEM (nofile, memlock) for the shardmq user in the limits file.
limits_value() {
    local item=$1 domain type it value
    [[ -r $LIMITS_FILE ]] || return 1
    while read -r domain type it value _; do
        [[ $domain == \#* || -z $domain ]] && continue
        if [[ $domain == shardmq && $it == "$item" && ( $type == hard || $type == - ) ]]; then
            printf '%s' "$value"
            return 0
        fi
    done < "$LIMITS_FILE"
    return 1
}
