#!/usr/bin/env bash
# One GPU check (an H200 or any CUDA machine), in under 6 minutes, from the repository root:
#   1. the tests marked cuda;  2. pyro-vae train/resume/evaluate/sample with --device cuda on the embedded data;
#   3. benchmarks/compile_speed.py --device cuda at B=128, 1024, 4096 (eager a, hand-written b, compiled e).
# Installs nothing from the network. pyro-ppl is pure Python: where the machine's Python lacks it, put its wheels
# (pyro-ppl, pyro-api) in .whl/ and they are installed offline into a temporary folder.
# Logs go to "$OUT" when set (else gpu_check_logs/); each part's failure is logged and later parts still run.
set -u
cd "$(dirname "$0")/.." || exit 2
LOGS="${OUT:-gpu_check_logs}"
mkdir -p "$LOGS"
PY="${PYTHON:-python3}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
if ! "$PY" -c "import pyro" 2>/dev/null && ls .whl/*.whl >/dev/null 2>&1; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --target /tmp/pyro_site .whl/*.whl \
        && export PYTHONPATH="$PYTHONPATH:/tmp/pyro_site"
fi
status=0
part() {  # part NAME TIMEOUT_S COMMAND...: run, log, record the outcome, never stop the script
    local name=$1 limit=$2
    shift 2
    local began=$SECONDS
    timeout "$limit" "$@" >"$LOGS/$name.log" 2>&1
    local rc=$?
    echo "$name: exit $rc after $((SECONDS - began)) s" | tee -a "$LOGS/summary.txt"
    [ "$rc" -eq 0 ] || { status=1; tail -n 20 "$LOGS/$name.log"; }
}
{ nvidia-smi -L; "$PY" -c "import torch, pyro; print(torch.__version__, pyro.__version__, torch.cuda.get_device_name())"; } \
    >"$LOGS/environment.txt" 2>&1
cat "$LOGS/environment.txt"

part tests_cuda 120 "$PY" -m pytest -m cuda -q -p no:cacheprovider tests/test_compile.py
RUN=/tmp/gpu_check_run
rm -rf "$RUN"
part train 60 "$PY" -m pyro_vae train --device cuda --epochs 2 --out "$RUN" --no-figures --no-progress
part resume 60 "$PY" -m pyro_vae train --resume "$RUN" --epochs 3
part evaluate 60 "$PY" -m pyro_vae evaluate "$RUN" --k 1,100 --n 1000 --out "$LOGS/eval.json"
part sample 30 "$PY" -m pyro_vae sample "$RUN" --n 16 --out "$LOGS/samples.png"
part compile_speed 150 "$PY" benchmarks/compile_speed.py --device cuda --batch-sizes 128,1024,4096 --rounds 10 --chunk 20
cp "$LOGS/compile_speed.log" "$LOGS/compile_speed.md" 2>/dev/null
echo "overall: $([ $status -eq 0 ] && echo ok || echo 'some part failed')" | tee -a "$LOGS/summary.txt"
exit $status
