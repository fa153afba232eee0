#!/usr/bin/env bash
# grpoctl installed into an empty virtual environment from PyPI with the tested constraints
# (constraints/cpu.txt), with an empty grpoctl cache, then what `make test` runs (ruff, pytest). A missing
# or drifting install step fails here before it lands. Prints the install and test times.
#
#   tools/fresh_install_check.sh             # the constraints as they are
#   tools/fresh_install_check.sh --update    # today's versions (only torch held); when the suite passes,
#                                            # constraints/cpu.txt is rewritten with what was installed
#   FRESH_DIR=/tmp/x PYTHON=python3.12 tools/fresh_install_check.sh -- -k imatrix   # pytest arguments
#
# pip's wheel cache still serves wheels it built before (llama-cpp-python's takes minutes to build);
# PIP_NO_CACHE_DIR=1 makes the install as slow as on a new machine.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-python3}
UPDATE=0
if [[ "${1:-}" == "--update" ]]; then UPDATE=1; shift; fi
if [[ "${1:-}" == "--" ]]; then shift; fi
WORK=${FRESH_DIR:-$(mktemp -d /tmp/grpoctl-fresh.XXXXXX)}
mkdir -p "$WORK"
echo "fresh install check in $WORK"

CONSTRAINTS="$ROOT/constraints/cpu.txt"
if (( UPDATE )); then
    CONSTRAINTS="$WORK/constraints-update.txt"
    grep -E '^torch==' "$ROOT/constraints/cpu.txt" > "$CONSTRAINTS"
fi

"$PY" -m venv "$WORK/venv"
VPY="$WORK/venv/bin/python"
export PATH="$WORK/venv/bin:$PATH"
export GRPOCTL_CACHE="$WORK/cache"  # nothing fetched or built before: the converter's sdist, llama.cpp's tools
export GRPOCTL_SETUP_STAMP_DIR="$WORK"  # the checkout's own stamp (of the Python `make` uses) stays as it is

start=$(date +%s)
"$VPY" "$ROOT/tools/setup_env.py" --constraints "$CONSTRAINTS"
installed=$(date +%s)
echo "fresh install check: install (with llama.cpp's tools) took $(( (installed - start) / 60 )) min $(( (installed - start) % 60 )) s"

cd "$ROOT"
rc=0
"$VPY" -m ruff check . && "$VPY" -m pytest -q "$@" || rc=$?
done_at=$(date +%s)
echo "fresh install check: ruff + pytest took $(( (done_at - installed) / 60 )) min $(( (done_at - installed) % 60 )) s, exit $rc"
"$VPY" -m pip freeze --exclude-editable > "$WORK/freeze.txt"
echo "installed set: $WORK/freeze.txt"

if (( UPDATE && rc == 0 )); then
    { grep -E '^#' "$ROOT/constraints/cpu.txt"; sed -E 's/\+[A-Za-z0-9.]+$//' "$WORK/freeze.txt" | sort -f; } \
        > "$ROOT/constraints/cpu.txt.new"
    mv "$ROOT/constraints/cpu.txt.new" "$ROOT/constraints/cpu.txt"
    echo "constraints/cpu.txt rewritten with the set that passed"
fi
exit $rc
