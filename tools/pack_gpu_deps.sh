#!/usr/bin/env bash
# Download the pure-Python wheels that a CUDA machine without network needs to run mmhat's
# backbones there: mmengine, mmcv without compiled ops (mmcv-lite) and their small
# dependencies. That machine brings torch, numpy, OpenCV, matplotlib and PyYAML itself.
# See docs/gpu_setup.md for installing the pack there.
#
# Usage: bash tools/pack_gpu_deps.sh [DEST]      (default DEST: .gpu_wheels/ in the checkout)
#   PYTHON=python3.12 ...    the interpreter whose pip downloads (default: python3)
#   GPU_PYTHON_VERSION=3.12  the target machine's Python (default 3.12)
#
# Idempotent: wheels already in DEST (and intact) are kept, wheels of other versions are
# removed. Exit status: 0 done, 2 a download or check failed, 3 the package index is
# unreachable.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
DEST=${1:-$ROOT/.gpu_wheels}
PYTHON=${PYTHON:-python3}
PY_VERSION=${GPU_PYTHON_VERSION:-3.12}

die() { echo "pack_gpu_deps: $2" >&2; exit "$1"; }

# mmengine and mmcv as pinned for the whole project; mmcv-lite is mmcv's own source built
# without ops (MMCV_WITH_OPS=0 names the distribution mmcv-lite), same version.
pin_of() {
    local pin
    pin=$(grep -E "^$1==" "$ROOT/requirements/constraints.txt" | head -n1 | cut -d= -f3)
    [ -n "$pin" ] || die 2 "no '$1==...' pin in requirements/constraints.txt"
    echo "$pin"
}
MMENGINE=$(pin_of mmengine)
MMCV=$(pin_of mmcv)

# Every wheel is py3-none-any. The versions are the ones this pack was verified with on
# Python 3.11 and 3.12 (docs/gpu_setup.md says why each is needed).
WHEELS=(
    "mmengine==$MMENGINE"
    "mmcv-lite==$MMCV"
    addict==2.4.0          # mmengine.config, mmcv
    yapf==0.43.0           # mmengine.config formats configs at import of Config
    platformdirs==4.14.9   # imported by yapf
    termcolor==3.3.0       # mmengine.logging
    rich==15.0.0           # mmengine.config, mmengine.registry
    markdown-it-py==4.3.0  # declared by rich
    mdurl==0.1.2           # declared by markdown-it-py
    pygments==2.21.0       # declared by rich
)

"$PYTHON" -m pip --version >/dev/null 2>&1 ||
    die 2 "'$PYTHON -m pip' does not run; set PYTHON to an interpreter with pip"
mkdir -p "$DEST"

# the wheel file name of a pin (PEP 427: name with - as _, compared case-insensitively)
prefix_of() {
    local name=${1%%==*} version=${1##*==}
    echo "${name//-/_}-$version-" | tr 'A-Z' 'a-z'
}
find_wheel() {
    local prefix f
    prefix=$(prefix_of "$1")
    for f in "$DEST"/*.whl; do
        [ -e "$f" ] || continue
        case "$(basename "$f" | tr 'A-Z' 'a-z')" in "$prefix"*) echo "$f"; return 0 ;; esac
    done
    return 1
}

# drop what no pin asks for (an older version would make pip install two of one package)
for f in "$DEST"/*.whl; do
    [ -e "$f" ] || continue
    wanted=0
    for pin in "${WHEELS[@]}"; do
        case "$(basename "$f" | tr 'A-Z' 'a-z')" in "$(prefix_of "$pin")"*) wanted=1 ;; esac
    done
    if [ "$wanted" = 0 ]; then
        echo "removing $(basename "$f") (not in the pinned list)"
        rm -f "$f"
    fi
done

missing=()
for pin in "${WHEELS[@]}"; do
    if f=$(find_wheel "$pin") && "$PYTHON" -m zipfile -t "$f" >/dev/null 2>&1; then
        continue
    fi
    [ -n "${f:-}" ] && rm -f "$f"  # truncated by an interrupted download
    missing+=("$pin")
done

if [ ${#missing[@]} -eq 0 ]; then
    echo "nothing to download: all ${#WHEELS[@]} wheels are in $DEST"
else
    echo "downloading ${#missing[@]} wheel(s) for Python $PY_VERSION: ${missing[*]}"
    log=$(mktemp)
    verbose_log=$(mktemp)
    trap 'rm -f "$log" "$verbose_log"' EXIT
    if ! "$PYTHON" -m pip download --only-binary=:all: --no-deps --python-version "$PY_VERSION" \
            --platform any --dest "$DEST" --log "$verbose_log" "${missing[@]}" >"$log" 2>&1; then
        grep -v 'is ignored: it is neither' "$log" | tail -n 15 >&2
        # pip reports an unreachable index only in its verbose log ("connection error")
        offline='connection error|NewConnectionError|Name or service not known|Temporary failure'
        offline+='|Network is unreachable|Connection refused|ConnectTimeout|timed out'
        offline+='|No route to host|ProxyError'
        if grep -qiE "$offline" "$log" "$verbose_log"; then
            die 3 "cannot reach the package index; run this where there is network, then copy $DEST"
        fi
        die 2 "pip could not download ${missing[*]} as py3-none-any wheels (output above)"
    fi
fi

# every pin is there, pure, intact
total=0
for pin in "${WHEELS[@]}"; do
    f=$(find_wheel "$pin") || die 2 "$pin: no wheel in $DEST after the download"
    case "$f" in
        *-none-any.whl) ;;
        *) die 2 "$(basename "$f") is not a pure (none-any) wheel" ;;
    esac
    "$PYTHON" -m zipfile -t "$f" >/dev/null 2>&1 ||
        die 2 "$(basename "$f") is corrupt; delete it and run again"
    size=$(wc -c <"$f")
    total=$((total + size))
    printf '  %-45s %8d KiB\n' "$(basename "$f")" $(((size + 1023) / 1024))
done
printf 'pack: %d wheels, %d KiB (%.1f MiB) in %s\n' "${#WHEELS[@]}" $(((total + 1023) / 1024)) \
    "$(echo "$total" | awk '{print $1 / 1048576}')" "$DEST"
