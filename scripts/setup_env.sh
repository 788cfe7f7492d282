#!/usr/bin/env bash
# Creates ./.venv and installs the whole pinned stack. Idempotent: a second run that finds the
# same pins already installed returns in about a second.
#
#   VENV=path   where to create the virtual environment (default: ./.venv)
#   PYTHON=exe  which interpreter creates it (default: python3.11, else python3)
#   FORCE=1     reinstall even if the stamp says the venv is up to date
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
VENV=${VENV:-$ROOT/.venv}
CONSTRAINTS=$ROOT/requirements/constraints.txt
WHEEL_DIR=$ROOT/.cache/wheels
D2_WHEEL=sal_detectron2-0.7.2-cp310-none-any.whl
D2_SHA256=491af0c7f79bdb2d178e46f6cb16a97c4ac968d45c41ea3f6b6435d59bbee561

# One set-up at a time (parallel `make test` / `make demo` invocations wait here).
mkdir -p "$ROOT/.cache"
exec 9>"$ROOT/.cache/setup.lock"
flock 9

say() { printf '[setup] %s\n' "$*"; }
die() { printf '[setup] ERROR: %s\n' "$*" >&2; exit 1; }

# The stamp records what was installed; any change to the pins, setup.py or this script redoes it.
stamp_value=$(cat "$CONSTRAINTS" requirements/base.txt setup.py scripts/setup_env.sh | sha256sum | cut -d' ' -f1)
stamp_file=$VENV/.focal_det_setup_stamp
if [[ "${FORCE:-0}" != 1 && -f "$stamp_file" && "$(cat "$stamp_file")" == "$stamp_value" ]]; then
  say "environment $VENV is up to date"
  exit 0
fi

if [[ -z "${PYTHON:-}" ]]; then
  if command -v python3.11 >/dev/null; then PYTHON=python3.11; else PYTHON=python3; fi
fi
if [[ ! -x "$VENV/bin/python" ]]; then
  say "creating virtual environment $VENV with $($PYTHON --version)"
  "$PYTHON" -m venv "$VENV" || die "could not create a venv with $PYTHON (is the venv module installed?)"
fi
PY=$VENV/bin/python
PIP=("$PY" -m pip --disable-pip-version-check)
# pip's site config may list find-links folders that do not exist; hide that noise only.
quiet_pip() { "${PIP[@]}" "$@" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2); }

say "installing torch, torchvision and detectron2's dependencies (pinned in requirements/constraints.txt)"
quiet_pip install -q -c "$CONSTRAINTS" -r requirements/base.txt

# detectron2 is not on PyPI under its own name. The registry copy that works here is the wheel
# sal-detectron2==0.7.2 (upstream detectron2's Python code, April 2024), tagged for CPython 3.10:
# pip refuses its tag on 3.11, so we download it without the tag check, verify its hash and
# install it with `installer`. Its compiled _C is not used by anything RetinaNet needs.
if "$PY" -c "import importlib.metadata as m; m.version('sal-detectron2')" >/dev/null 2>&1; then
  say "detectron2 (sal-detectron2 0.7.2) already installed"
elif "$PY" -c "import detectron2" 2>/dev/null; then
  say "using the detectron2 already installed in $VENV (not from the registry wheel)"
else
  mkdir -p "$WHEEL_DIR"
  if [[ ! -f "$WHEEL_DIR/$D2_WHEEL" ]]; then
    say "downloading $D2_WHEEL"
    quiet_pip download -q --no-deps --only-binary=:all: --python-version 3.10 \
      -d "$WHEEL_DIR" sal-detectron2==0.7.2 || die "could not download sal-detectron2==0.7.2 from the package index"
  fi
  "$ROOT/scripts/check_sha256.sh" "$WHEEL_DIR/$D2_WHEEL" "$D2_SHA256"
  "$PY" -m installer "$WHEEL_DIR/$D2_WHEEL" || die "installing $D2_WHEEL into $VENV failed"
  say "installed detectron2 from $D2_WHEEL (sha256 verified)"
fi

say "installing focal_det (editable) with its test and export extras"
quiet_pip install -q -c "$CONSTRAINTS" --no-build-isolation -e ".[test,export]"

"$PY" -c "import focal_det, detectron2, torch; print('[setup] ok: focal_det', focal_det.__version__, '| detectron2', detectron2.__version__, '| torch', torch.__version__)"
echo "$stamp_value" > "$stamp_file"
