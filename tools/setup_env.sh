#!/usr/bin/env bash
# Creates .venv and installs the pinned stack (see docs/get_started.md, "Install details").
#
# Environment:
#   PYTHON            interpreter for the venv (default: python3.11)
#   VENV              venv folder (default: .venv)
#   KEEP_TORCH=1      keep a torch you already have (e.g. a CUDA build): the venv
#                     sees the interpreter's site-packages and torch is not installed
#   MMHAT_WHEELHOUSE  optional folder with a prebuilt mmcv-2.1.0 wheel for this torch (also
#                     looked for in its subfolder torch-<version>/, e.g. torch-2.1.2/)
#   TORCH_VERSION     the torch to install (default 2.13.0; make test-compat: 2.1.2)
#   MMHAT_CACHE       where built wheels are cached (default: ~/.cache/mmhat)
#   TORCH_INDEX_URL   an extra index to take torch from, e.g. https://download.pytorch.org/whl/cpu
#                     for the CPU build (plain PyPI serves the CUDA build on Linux x86_64)
#   WITH_CLS=1        also the classification extra (requirements/cls.txt: mmpretrain and the
#                     torchvision of this torch); needs a torch whose torchvision is on the
#                     index (PyPI's builds: yes; the local 2.13.0+cpu: no)
set -euo pipefail

PYTHON=${PYTHON:-python3.11}
VENV=${VENV:-.venv}
KEEP_TORCH=${KEEP_TORCH:-0}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}
MMHAT_CACHE=${MMHAT_CACHE:-$HOME/.cache/mmhat}
MMCV_VERSION=2.1.0
TORCH_INDEX=()
[ -n "${TORCH_INDEX_URL:-}" ] && TORCH_INDEX=(--extra-index-url "$TORCH_INDEX_URL")

log() { printf '[setup] %s\n' "$*"; }

if [ ! -x "$VENV/bin/python" ]; then
  if [ "$KEEP_TORCH" = 1 ]; then
    log "creating $VENV with access to $PYTHON's site-packages (KEEP_TORCH=1)"
    "$PYTHON" -m venv --system-site-packages "$VENV"
  else
    log "creating $VENV with $PYTHON"
    "$PYTHON" -m venv "$VENV"
  fi
fi
PY="$VENV/bin/python"
"$PY" -m pip install -q --upgrade pip

CONSTRAINTS=$(mktemp)
trap 'rm -f "$CONSTRAINTS"' EXIT
cp requirements/constraints.txt "$CONSTRAINTS"
if [ "$KEEP_TORCH" = 1 ]; then
  if ! "$PY" -c 'import torch' 2>/dev/null; then
    echo "KEEP_TORCH=1 but $PYTHON has no torch: install your torch first, or drop KEEP_TORCH" >&2
    exit 1
  fi
  TORCH_VERSION=$("$PY" -c 'import torch; print(torch.__version__)')
  echo "torch==$TORCH_VERSION" >> "$CONSTRAINTS"
  log "keeping torch $TORCH_VERSION"
else
  echo "torch==$TORCH_VERSION" >> "$CONSTRAINTS"
fi
# torch wheels before 2.4 are built against numpy 1 ("A module that was compiled using
# NumPy 1.x cannot be run in NumPy 2"): keep numpy 1 beside them.
if "$PYTHON" - "$TORCH_VERSION" <<'PY'
import sys
major, minor = (int(p) for p in sys.argv[1].split('+')[0].split('.')[:2])
sys.exit(0 if (major, minor) < (2, 4) else 1)
PY
then
  echo 'numpy<2' >> "$CONSTRAINTS"
  log "torch $TORCH_VERSION: numpy<2"
fi
PIP=("$PY" -m pip install -q -c "$CONSTRAINTS")

log "build tools and torch"
if [ "$KEEP_TORCH" = 1 ]; then
  "${PIP[@]}" 'setuptools>=77,<81' wheel ninja numpy
else
  "${PIP[@]}" ${TORCH_INDEX[@]+"${TORCH_INDEX[@]}"} "torch==$TORCH_VERSION" 'setuptools>=77,<81' wheel ninja numpy
fi

have_ops() { "$PY" -c 'from mmcv.ops import nms, RoIAlign' >/dev/null 2>&1; }

if ! have_ops; then
  # The cache key: mmcv version, torch build and interpreter ABI.
  KEY=$("$PY" -c "import sys, torch; print(f'mmcv-$MMCV_VERSION-torch-{torch.__version__}-cp{sys.version_info[0]}{sys.version_info[1]}')")
  CACHE_DIR="$MMHAT_CACHE/wheels/$KEY"
  installed=0
  # A wheelhouse may keep wheels of other torch versions in torch-<version>/ (same file name).
  TORCH_SHORT=$("$PY" -c "import torch; print(torch.__version__.split('+')[0])")
  WHEELHOUSE_DIRS=()
  if [ -n "${MMHAT_WHEELHOUSE:-}" ]; then
    WHEELHOUSE_DIRS=("$MMHAT_WHEELHOUSE/torch-$TORCH_SHORT" "$MMHAT_WHEELHOUSE")
  fi
  for dir in ${WHEELHOUSE_DIRS[@]+"${WHEELHOUSE_DIRS[@]}"} "$CACHE_DIR"; do
    [ -n "$dir" ] && [ -d "$dir" ] || continue
    for whl in "$dir"/mmcv-$MMCV_VERSION-*.whl; do
      [ -f "$whl" ] || continue
      log "installing $whl"
      "${PIP[@]}" "$whl"
      if have_ops; then installed=1; break 2; fi
      log "$whl does not provide mmcv.ops for this torch; trying the next source"
      "$PY" -m pip uninstall -q -y mmcv
    done
  done
  if [ "$installed" = 0 ]; then
    log "building mmcv $MMCV_VERSION with ops from source (17-40 min on 2 cores; cached in $CACHE_DIR)"
    mkdir -p "$CACHE_DIR"
    BUILD_DIR=$(mktemp -d)
    MMCV_WITH_OPS=1 FORCE_CUDA=${FORCE_CUDA:-0} MAX_JOBS=${MAX_JOBS:-2} \
      "$PY" -m pip wheel --no-deps --no-build-isolation -c "$CONSTRAINTS" -w "$BUILD_DIR" "mmcv==$MMCV_VERSION"
    mv "$BUILD_DIR"/mmcv-*.whl "$CACHE_DIR"/
    rm -rf "$BUILD_DIR"
    "${PIP[@]}" "$CACHE_DIR"/mmcv-$MMCV_VERSION-*.whl
    have_ops || { echo "mmcv built but mmcv.ops does not import" >&2; exit 1; }
  fi
fi

log "OpenMMLab stack, test tools and mmhat (editable)"
"${PIP[@]}" -r requirements/runtime.txt -r requirements/tests.txt
"${PIP[@]}" --no-build-isolation -e .
if [ "${WITH_CLS:-0}" = 1 ]; then
  log "classification extra (mmpretrain, torchvision)"
  "${PIP[@]}" -r requirements/cls.txt
  "$PY" -c 'import torchvision, mmpretrain; from torchvision.ops import nms; print(f"[setup] torchvision {torchvision.__version__}, mmpretrain {mmpretrain.__version__}")'
fi
"$PY" - <<'PY'
import torch, mmcv, mmdet, mmseg, mmengine
from mmcv.ops import nms, RoIAlign  # noqa: F401  proof the compiled ops exist
print(f'[setup] torch {torch.__version__}, mmengine {mmengine.__version__}, mmcv {mmcv.__version__}, '
      f'mmdet {mmdet.__version__}, mmseg {mmseg.__version__}')
PY
