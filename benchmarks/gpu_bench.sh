#!/bin/bash
# The training benchmark on one GPU (issue 14): instructkit vs the HF Trainer vs TRL tuned, ONE WHOLE EPOCH
# each, warm-up included, bf16 autocast with fp32 master weights, on the SmolLM2-135M shape and the
# Llama-3.2-1B shape (random weights), plus p99 / median step time after the first 10 steps.
#
#   bash benchmarks/gpu_bench.sh prepare   # HERE (has ../shared and the models): inputs + wheels, ~1 min
#   bash benchmarks/gpu_bench.sh           # THERE (carry .devbench and .whl): ~5-7 min, results in $OUT
#
# prepare writes .devbench/smollm2 (512 tokenized examples, 128 from each source, and the SmolLM2 tokenizer;
# the 1B shape reads the same token ids, its vocabulary holds them) and downloads into .whl/ the wheels the
# GPU image lacks (pure-Python or cp312 manylinux; the image has torch, transformers, accelerate, numpy).
# Goals (issue 14): over the epoch >= 1.3x the Trainer and >= 1.1x TRL tuned in tokens/s; after 10 warm-up
# steps p99 / median step time <= 1.25 (bench_train.py writes them under "goals_met").
set -u
if [ "${1:-}" = prepare ]; then
  set -e
  PYTHONPATH=src python benchmarks/bench_train.py --save-inputs .devbench/smollm2 --per-dataset 128
  mkdir -p .whl
  TRL=$(python -c "import trl; print(trl.__version__)")
  python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 -d .whl \
    pydantic pydantic_core annotated-types typing-inspection "datasets<6" dill multiprocess "trl==$TRL"
  ls .whl
  exit 0
fi
OUT=${OUT:-gpu_results}; mkdir -p "$OUT"
started=$(date +%s)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  || exit 1
export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, transformers, accelerate, datasets, trl, pyarrow, pydantic
print('torch', torch.__version__, 'cuda', torch.version.cuda, 'cudnn', torch.backends.cudnn.version(),
      'transformers', transformers.__version__, 'accelerate', accelerate.__version__,
      'datasets', datasets.__version__, 'trl', trl.__version__, 'pyarrow', pyarrow.__version__)" | tee -a "$OUT/gpu.txt"
B="python3 benchmarks/bench_train.py --device cuda --precision bf16 --epoch --repeats 1 --inputs .devbench/smollm2"
S="instructkit,hf_trainer,trl_tuned"
# 1. SmolLM2-135M shape, batch 8 (the CPU benchmark's setting): one epoch per system.
timeout ${T1:-180} $B --systems $S --out "$OUT/train_gpu_smollm2.json" 2>&1 | tail -45
echo "elapsed $(( $(date +%s) - started )) s"
[ -n "${ONLY_FIRST:-}" ] && exit 0
# 2. Llama-3.2-1B shape (1.24B parameters), batch 8.
timeout ${T2:-240} $B --systems $S --shape llama1b --out "$OUT/train_gpu_llama1b.json" 2>&1 | tail -45
echo "elapsed $(( $(date +%s) - started )) s"
# 3. (optional, EXTRA=1) the baselines with instructkit's attention choice too (cuDNN attention off).
if [ -n "${EXTRA:-}" ]; then
  timeout ${T3:-150} $B --systems $S --baselines-same-attention --out "$OUT/train_gpu_smollm2_nocudnn.json" 2>&1 \
    | tail -30
fi
echo "done in $(( $(date +%s) - started )) s"
