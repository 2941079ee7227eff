#!/usr/bin/env bash
# The one install path of bids_cadiff: used by `make`, `.ci/run` and the Dockerfile.
#
#   scripts/install.sh [--system-only | --python-only] [PYTHON]
#
# System part: Debian's mricron-data (Colin27 atlas at /usr/share/mricron/templates) and, with
#   the test extras only (CADIFF_EXTRAS contains "test", the default), Debian's chromium for
#   the browser tests of the HTML reports; each when missing, in one apt-get run when apt-get is
#   usable (root). Otherwise it says what to install. CADIFF_EXTRAS="" never gets chromium.
# Python part: installs the package and its pinned dependencies (constraints.txt) into the
#   interpreter PYTHON (default: python3 on PATH), with the test extras when CADIFF_EXTRAS is
#   unset (CADIFF_EXTRAS="" installs the runtime only). TORCH_SPEC overrides the torch
#   requirement (the container sets a CUDA build); by default constraints.txt pins the CPU
#   build that this project's machines carry.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
mode="all"
case "${1:-}" in
  --system-only) mode="system"; shift ;;
  --python-only) mode="python"; shift ;;
esac
python="${1:-python3}"
extras="${CADIFF_EXTRAS-test}"

wants_test_extras() {
  case ",${extras// /}," in
    *,test,*) return 0 ;;
    *) return 1 ;;
  esac
}

install_system() {
  local missing=()
  if [ -f /usr/share/mricron/templates/ch2.nii.gz ]; then
    echo "install.sh: Colin27 present (/usr/share/mricron/templates/ch2.nii.gz)"
  else
    missing+=(mricron-data)
  fi
  if wants_test_extras; then
    if [ -x /usr/bin/chromium ]; then
      echo "install.sh: chromium present (/usr/bin/chromium)"
    else
      missing+=(chromium)
    fi
  fi
  if [ "${#missing[@]}" -eq 0 ]; then
    return
  fi
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    echo "install.sh: installed ${missing[*]}"
  else
    local pkg
    for pkg in "${missing[@]}"; do
      case "$pkg" in
        mricron-data)
          echo "install.sh: WARNING: Colin27 missing; run 'sudo apt-get install mricron-data'" \
               "or pass --atlas to bids_cadiff" >&2 ;;
        chromium)
          echo "install.sh: WARNING: chromium missing, the browser tests of the HTML reports" \
               "will be skipped; run 'sudo apt-get install chromium'" >&2 ;;
      esac
    done
  fi
}

install_python() {
  "$python" -m pip install -q --upgrade pip
  local spec="$here"
  if [ -n "$extras" ]; then spec="${here}[${extras}]"; fi
  if [ -n "${TORCH_SPEC:-}" ]; then
    "$python" -m pip install -q "$TORCH_SPEC"
    # the container's torch stays; every other pin still applies
    grep -v '^torch==' "$here/constraints.txt" > "${TMPDIR:-/tmp}/cadiff-constraints.txt"
    "$python" -m pip install -q -c "${TMPDIR:-/tmp}/cadiff-constraints.txt" -e "$spec"
  else
    "$python" -m pip install -q -c "$here/constraints.txt" "torch==$(sed -n 's/^torch==//p' "$here/constraints.txt")"
    "$python" -m pip install -q -c "$here/constraints.txt" -e "$spec"
  fi
  echo "install.sh: installed bids_cadiff into $("$python" -c 'import sys; print(sys.prefix)')"
}

case "$mode" in
  system) install_system ;;
  python) install_python ;;
  all) install_system; install_python ;;
esac
