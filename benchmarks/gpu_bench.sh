#!/bin/bash
# The training benchmark on a GPU (bf16 autocast, fp32 master weights), in one short script.
# Prepared here (this machine has ../shared and the models; the GPU machine has neither):
#   PYTHONPATH=src python benchmarks/bench_train.py --save-inputs .devbench/smollm2
#   PYTHONPATH=src python benchmarks/bench_train.py --save-inputs .devbench/gemma3 --shape gemma3
#   pip download (--no-deps, cp312 manylinux) into .whl/: the packages the GPU image lacks
#   (pydantic, pydantic_core, annotated-types, typing-inspection, datasets, dill, multiprocess, trl)
# Run there with .devbench and .whl carried; results land in $OUT (or ./gpu_results).
set -u
OUT=${OUT:-gpu_results}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  || exit 1
export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, transformers, accelerate, datasets, trl, pyarrow, pydantic
print('torch', torch.__version__, 'transformers', transformers.__version__, 'accelerate', accelerate.__version__,
      'datasets', datasets.__version__, 'trl', trl.__version__, 'pyarrow', pyarrow.__version__)" | tee -a "$OUT/gpu.txt"
B="python3 benchmarks/bench_train.py --device cuda --precision bf16 --steps 20"
# 1. SmolLM2-135M shape, batch 8 (the CPU benchmark's setting), sdpa, all three systems, A B C A B C.
timeout ${T1:-200} $B --inputs .devbench/smollm2 --repeats ${R1:-2} --out "$OUT/train_gpu_smollm2.json" 2>&1 | tail -40
[ -n "${ONLY_FIRST:-}" ] && exit 0
# 2. Gemma-3-270M shape, one round.
timeout 120 $B --inputs .devbench/gemma3 --shape gemma3 --repeats 1 --out "$OUT/train_gpu_gemma3.json" 2>&1 | tail -30
# 3. instructkit's packed batches with FlexAttention (document mask from position_ids) instead of sdpa.
timeout 90 $B --inputs .devbench/smollm2 --repeats 1 --systems instructkit --attn flex_attention \
  --out "$OUT/train_gpu_smollm2_flex.json" 2>&1 | tail -30
echo done
