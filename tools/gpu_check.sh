#!/usr/bin/env bash
# All CUDA checks in one prepared run (about 5-8 minutes on one H100/H200):
#   1. tools/benchmark_backbone.py   bf16, full ORION-L (24 blocks, 640x640), teacher vs student, sdpa vs math;
#                                    and the joint student (8 heads + MLP 1536 of 2730) against its ceiling
#   2. tools/benchmark_kd_step.py    bf16, KD step vs student-only step, tiny world and full ORION-L
#   3. NCCL smoke test               the tiny KD config through orion_dist_train.sh (2 processes, or 1 per GPU
#                                    when fewer GPUs exist: NCCL needs one GPU per rank)
# Writes one JSON summary: ${OUT_DIR:-work_dirs/gpu_check}/gpu_check.json
#
#   bash tools/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR=${OUT_DIR:-work_dirs/gpu_check}
PYTHON=${PYTHON:-python3}
mkdir -p "$OUT_DIR"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

if ! "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "error: no CUDA device visible to $PYTHON; this script is for GPU machines" >&2
    exit 2
fi
if ! "$PYTHON" -c "import mmengine, transformers, safetensors, matplotlib, mmcv.models" 2>/dev/null; then
    echo "error: $PYTHON lacks ORION-KD's dependencies; run 'pip install -e .' (or 'make setup') first" >&2
    exit 2
fi
GPUS=$("$PYTHON" -c "import torch; print(min(2, torch.cuda.device_count()))")
status=0

[ -f ckpt/orion_tiny/orion_tiny.pth ] || "$PYTHON" tools/train_tiny_teacher.py || status=1

echo "== 1/3 backbone benchmark (bf16, ORION-L)"
timeout 240 "$PYTHON" tools/benchmark_backbone.py --depth 24 --repeats 20 --warmup 3 --dtype bf16 \
    --out "$OUT_DIR/benchmark_backbone.json" || status=1
timeout 240 "$PYTHON" tools/benchmark_backbone.py --depth 24 --repeats 20 --warmup 3 --dtype bf16 \
    --student-heads 8 --student-mlp-hidden 1536 --skip-math --out "$OUT_DIR/benchmark_backbone_joint.json" || status=1

echo "== 2/3 KD step benchmark (bf16)"
timeout 240 "$PYTHON" tools/benchmark_kd_step.py --settings tiny,orion-l --depth 24 --repeats 10 \
    --out "$OUT_DIR/benchmark_kd_step.json" || status=1

echo "== 3/3 NCCL run of the tiny KD config on $GPUS process(es)"
MASTER_PORT=${MASTER_PORT:-29533} timeout 300 ./adzoo/orion/orion_dist_train.sh \
    adzoo/orion/configs/orion_tiny_kd_train.py "$GPUS" --work-dir "$OUT_DIR/nccl_tiny_kd" \
    --cfg-options runner.max_epochs=1 > "$OUT_DIR/nccl_tiny_kd.txt" 2>&1
nccl_status=$?
tail -n 5 "$OUT_DIR/nccl_tiny_kd.txt"
[ $nccl_status -eq 0 ] || status=1

"$PYTHON" - "$OUT_DIR" "$GPUS" "$nccl_status" <<'PY'
import json, os, sys, torch
out, gpus, nccl = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
def load(name):
    path = os.path.join(out, name)
    return json.load(open(path)) if os.path.isfile(path) else None
summary = dict(gpu=torch.cuda.get_device_name(0), gpu_count=torch.cuda.device_count(), torch=torch.__version__,
               cuda=torch.version.cuda, backbone=load("benchmark_backbone.json"),
               backbone_joint=load("benchmark_backbone_joint.json"), kd_step=load("benchmark_kd_step.json"),
               nccl=dict(processes=gpus, exit_status=nccl,
                         exported=os.path.isfile(os.path.join(out, "nccl_tiny_kd", "student_export.pth"))))
tmp = os.path.join(out, "gpu_check.json.tmp")
json.dump(summary, open(tmp, "w"), indent=2)
os.replace(tmp, os.path.join(out, "gpu_check.json"))
b, j = summary["backbone"] or {}, summary["backbone_joint"] or {}
print("summary:", json.dumps(dict(gpu=summary["gpu"], speedup=b.get("speedup"), ceiling=b.get("ceiling"),
      joint_speedup=j.get("speedup"), joint_ceiling=j.get("ceiling"),
      sdpa_vs_math=b.get("sdpa_vs_math_speedup"), nccl=summary["nccl"])))
PY
exit $status
