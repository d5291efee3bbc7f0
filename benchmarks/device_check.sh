#!/usr/bin/env bash
# The GPU check of curvlab (benchmarks/device_check.py) as one command for the device tool.
#
# Once, here (where pip reaches PyPI), fetch the wheels the GPU image lacks (curvlinops and
# einconv, pure Python) into .whl/ (ignored by git, carried by the run):
#
#     bash benchmarks/device_check.sh fetch
#
# Then on the device machine, through the device tool's `run`, from the repo root:
#
#     run(command="bash benchmarks/device_check.sh", carry=[".whl"], timeout_s=600)
#
# It installs the carried wheels (if any) into /tmp/site, runs the check with an overall timeout
# (DEVICE_CHECK_TIMEOUT, default 480 s; the check's own budget DEVICE_CHECK_BUDGET, default
# 420 s) and writes device_check.json, device_check.md, device_check.log and nvidia-smi.txt to
# $OUT (or ./device_check_out without $OUT). Extra arguments go to device_check.py (e.g.
# --parts products,lanczos). Without the wheels the lanczos part reports scipy+curvlinops as
# skipped. Exit status: the check's (1 if a self-check failed), 124 on the overall timeout.
set -u
cd "$(dirname "$0")/.."

if [ "${1:-}" = "fetch" ]; then
    mkdir -p .whl .git/info
    grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
    exec python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 \
        -d .whl curvlinops-for-pytorch==3.0.1 einconv==0.1.0
fi

OUT="${OUT:-$PWD/device_check_out}"
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl && export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv \
    > "$OUT/nvidia-smi.txt" 2>&1 || true
set -o pipefail
timeout -k 15 "${DEVICE_CHECK_TIMEOUT:-480}" python3 benchmarks/device_check.py "$OUT" \
    --budget "${DEVICE_CHECK_BUDGET:-420}" "$@" 2>&1 | tee "$OUT/device_check.log"
