#!/usr/bin/env bash
# One run (at most 5 minutes) on a CUDA machine, offline: nothing is downloaded, tensors are synthetic.
#   1. the edit benchmarks in bf16 on one 8192² tensor and over every tensor of a synthetic ~1B-parameter
#      Llama-layout model, each against device-to-device copy (benchmarks/run.py --device cuda);
#   2. the approximation term of the tiny LM pair, grad vs jvp (benchmarks/approx_bench.py --device cuda).
# Writes benchmarks/results-gpu.json. Usage: bash benchmarks/gpu.sh   (PYTHON=... to pick the interpreter)
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$(test -x .venv/bin/python && echo .venv/bin/python || echo python)}
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

"$PY" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name())" || exit 1

# 1. edits: ~3 minutes at most
timeout 180 "$PY" benchmarks/run.py --device cuda --json "$tmp/edits.json" | tee "$tmp/edits.txt"
edits_rc=${PIPESTATUS[0]}

# 2. approximation term: the rest of the 5 minutes (trains the small pair first if it is not cached)
approx_rc=127
if [ -f benchmarks/approx_bench.py ]; then
  timeout 100 "$PY" benchmarks/approx_bench.py --device cuda --dtype float32 2>&1 | tee "$tmp/approx.txt"
  approx_rc=${PIPESTATUS[0]}
fi

"$PY" - "$tmp" "$edits_rc" "$approx_rc" <<'PYEOF'
import json, sys
from pathlib import Path
tmp, edits_rc, approx_rc = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
result = {"edits_exit": edits_rc, "approx_exit": approx_rc}
if (tmp / "edits.json").exists():
    result.update(json.loads((tmp / "edits.json").read_text()))
if (tmp / "approx.txt").exists():
    result["approx_report"] = (tmp / "approx.txt").read_text()  # approx_bench prints a table; kept as text
Path("benchmarks/results-gpu.json").write_text(json.dumps(result, indent=2) + "\n")
print("wrote benchmarks/results-gpu.json")
PYEOF
