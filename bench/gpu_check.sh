#!/usr/bin/env bash
# The GPU check, in one run of about 8 minutes at most, for a session that has an H100/H200 lent:
#   1. every `@pytest.mark.gpu` test (the files that have one);
#   2. bench/serve_throughput.py, Qwen3-0.6B-shaped, 256 in / 256 out, widths 1 and 256, CUDA graphs off and on;
#   3. bench/decode_speed.py, eager against CUDA graphs, batches 1 and 256;
#   4. bench/runtime_overhead.py with the real engine on the GPU.
# Each part runs under its own time limit and ends with `RESULT part=NAME status=S seconds=T`; the parts'
# own RESULT lines come before that, and the last line is `RESULT gpu_check=done parts=N failed=F`.
# The exit status is 0 only when every part passed.
#
#   bash bench/gpu_check.sh                      # from anywhere, with pie's environment's python on PATH
#   PYTHON=/opt/venv/bin/python bash bench/gpu_check.sh
#   GPU_CHECK_DEVICE=cuda:1 bash bench/gpu_check.sh
set -uo pipefail

PYTHON=${PYTHON:-python3}
DEVICE=${GPU_CHECK_DEVICE:-cuda:0}
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT" || exit 1
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
PARTS=0
FAILED=0

# part NAME SECONDS COMMAND...: runs COMMAND under a time limit, then one RESULT line with its exit status.
part() {
	local name=$1 limit=$2 start status
	shift 2
	PARTS=$((PARTS + 1))
	start=$(date +%s)
	printf '\n=== %s (at most %ss): %s\n' "$name" "$limit" "$*"
	timeout --kill-after=10 "$limit" "$@"
	status=$?
	[ "$status" = 0 ] || FAILED=$((FAILED + 1))
	printf 'RESULT part=%s status=%s seconds=%s\n' "$name" "$status" "$(($(date +%s) - start))"
}

# What this machine is, as one RESULT line; a machine without a usable GPU stops here.
if ! "$PYTHON" - "$DEVICE" <<'EOF'; then
import importlib.metadata as md
import sys

import torch

if not torch.cuda.is_available():
    print("RESULT gpu_check=no_gpu torch=" + torch.__version__)
    sys.exit(1)
device = torch.device(sys.argv[1])
try:
    flashinfer = md.version("flashinfer-python")
except md.PackageNotFoundError:
    flashinfer = "none"
name = torch.cuda.get_device_name(device).replace(" ", "_")
print(f"RESULT gpu={name} torch={torch.__version__} cuda={torch.version.cuda} flashinfer={flashinfer}")
EOF
	exit 1
fi

mapfile -t GPU_TESTS < <(grep -l 'mark\.gpu' tests/test_*.py)
PER_TEST=()
if "$PYTHON" -c 'import pytest_timeout' 2>/dev/null; then
	PER_TEST=(--timeout 170) # one hung test must not take the whole part's time
fi
part gpu_tests 180 "$PYTHON" -m pytest -q -m gpu "${PER_TEST[@]}" -p no:cacheprovider -rs "${GPU_TESTS[@]}"

SERVE=(bench/serve_throughput.py --preset qwen3-0.6b --device "$DEVICE" --dtype bfloat16 --in 256 --out 256
	--widths 1 256)
part serve_eager 90 "$PYTHON" "${SERVE[@]}"
part serve_graphs 90 "$PYTHON" "${SERVE[@]}" --cuda-graphs

part decode_speed 70 "$PYTHON" bench/decode_speed.py --preset qwen3-0.6b --device "$DEVICE" --configs eager graphs \
	--batches 1 256 --steps 32

part runtime_overhead 60 "$PYTHON" bench/runtime_overhead.py --engine real --device "$DEVICE" --counts 1 32 256 \
	--steps 32 --repeats 1

printf '\nRESULT gpu_check=done parts=%s failed=%s\n' "$PARTS" "$FAILED"
[ "$FAILED" = 0 ]
