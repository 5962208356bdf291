#!/usr/bin/env bash
# GPU-machine checks for the core issue, run through the device tool from the repo root:
# gate overhead on CUDA, the CUDA path of the CLI, and the KL-weighting measurement on 16 CPU cores.
# Needs Fashion-MNIST's IDX files in $BMRS_FASHION_MNIST_DIR (carried as .fmnist).
set -u
export PYTHONUNBUFFERED=1 BMRS_FASHION_MNIST_DIR=${BMRS_FASHION_MNIST_DIR:-$PWD/.fmnist}
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
# the packages (bmrs_surgery, cli, models) import from the checkout as they are
export PYTHONPATH=$PWD
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())"
python3 benchmarks/gate_overhead.py --device cuda --rounds 15 --steps 100 --json "$OUT/gate_overhead/cuda.json"
python3 benchmarks/cuda_graph_check.py
(cd /tmp && python3 -m cli.main lenet5 --data fashion-mnist --device cuda --epochs 1 --finetune-epochs 0 \
    --batch-size 128 -q --out /tmp/cuda_run > "$OUT/cuda_cli.txt" 2>&1); echo "cuda cli exit $?"; tail -n 4 "$OUT/cuda_cli.txt"
python3 benchmarks/score_speed.py --device cuda --json "$OUT/score_speed/cuda.json"
[ -n "${KL_EPOCHS:-}" ] && python3 benchmarks/kl_weighting.py --epochs ${KL_EPOCHS:-20} --finetune 5 --seeds 2 --jobs 16 --out "$OUT/kl_weighting/cpu"
