#!/usr/bin/env bash
# Every CUDA measurement in one prepared run, from a fresh clone, within 8 minutes on one H100/H200 (the step
# timeouts add up to 470 s with one GPU):
#   0. the shipped miniature teacher, materialised (checksum checked; not retrained)
#   1. tools/benchmark_backbone.py  bf16, full ORION-L (24 blocks, 640x640): teacher vs heads-only student
#                                   (8 of 16 heads, + sdpa vs math), then teacher vs joint student (8 heads +
#                                   MLP 1536 of 2730), then teacher vs the student the budget chooses for a 3x
#                                   target (--target-speedup 3: heads, channels and whole blocks, analytic costs);
#                                   medians of alternating rounds, peak memory, the budget's predicted speedup
#   2. tools/benchmark_kd_step.py   bf16, KD step vs student-only step, tiny world and full ORION-L
#   3. NCCL DDP smoke run           the tiny KD config on 2 ranks (only when 2 GPUs are visible), which must
#                                   export student_pruned.pth
# Then tools/gpu_check_summary.py prints the ratios and writes ${OUT_DIR:-work_dirs/gpu_check}/gpu_check.json.
# Without a CUDA GPU it prints one line and exits 3; a failed step makes the exit status 1.
#
#   bash tools/gpu_check.sh            # PYTHON=... to pick the interpreter (default: .venv/bin/python)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR=${OUT_DIR:-work_dirs/gpu_check}
if [ -z "${PYTHON:-}" ]; then
    if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

if ! "$PYTHON" -c "import torch" 2>/dev/null; then
    echo "gpu_check: $PYTHON cannot import torch: run 'make setup' (or set PYTHON=) first" >&2
    exit 2
fi
if ! "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_check: no CUDA GPU visible to $PYTHON ($("$PYTHON" -c "import torch; print('torch', \
torch.__version__, 'CUDA build:', torch.version.cuda)")): nothing measured; run it on a GPU machine with a CUDA \
build of torch" >&2
    exit 3
fi
GPUS=$("$PYTHON" -c "import torch; print(torch.cuda.device_count())")
mkdir -p "$OUT_DIR"
status=0

echo "== 0/3 the shipped miniature teacher"
timeout 60 "$PYTHON" tools/train_tiny_teacher.py --materialize || status=1

echo "== 1/3 backbone speed (bf16, ORION-L): teacher vs heads-only, vs joint, vs the 3x budget"
timeout 120 "$PYTHON" tools/benchmark_backbone.py --depth 24 --repeats 15 --warmup 3 --dtype bf16 \
    --student-heads 8 --out "$OUT_DIR/benchmark_backbone.json" || status=1
timeout 90 "$PYTHON" tools/benchmark_backbone.py --depth 24 --repeats 15 --warmup 3 --dtype bf16 \
    --student-heads 8 --student-mlp-hidden 1536 --skip-math --out "$OUT_DIR/benchmark_backbone_joint.json" \
    || status=1
timeout 80 "$PYTHON" tools/benchmark_backbone.py --depth 24 --repeats 15 --warmup 3 --dtype bf16 \
    --target-speedup 3 --save-config "$OUT_DIR/budget3x_config.json" --skip-math \
    --out "$OUT_DIR/benchmark_backbone_budget3x.json" || status=1

echo "== 2/3 KD step vs student-only step (bf16)"
timeout 120 "$PYTHON" tools/benchmark_kd_step.py --settings tiny,orion-l --depth 24 --repeats 8 \
    --out "$OUT_DIR/benchmark_kd_step.json" || status=1

ranks=0
nccl=()
if [ "$GPUS" -ge 2 ]; then
    ranks=2
    echo "== 3/3 NCCL DDP smoke run: the tiny KD config on 2 ranks"
    rm -rf "$OUT_DIR/nccl_tiny_kd"
    PYTHON="$PYTHON" MASTER_PORT=${MASTER_PORT:-29533} timeout 120 bash adzoo/orion/orion_dist_train.sh \
        adzoo/orion/configs/orion_tiny_kd_train.py 2 --work-dir "$OUT_DIR/nccl_tiny_kd" \
        --cfg-options runner.max_epochs=1 > "$OUT_DIR/nccl_tiny_kd.txt" 2>&1
    nccl=(--nccl-status $?)
    tail -n 5 "$OUT_DIR/nccl_tiny_kd.txt"
else
    echo "== 3/3 NCCL DDP smoke run skipped: $GPUS GPU visible, it needs 2"
fi

"$PYTHON" tools/gpu_check_summary.py --out-dir "$OUT_DIR" --ranks "$ranks" ${nccl[@]+"${nccl[@]}"} || status=1
exit $status
