#!/usr/bin/env bash
# Reproduces the results table in README.md: nanoGPT's CPU Shakespeare-char model with the baseline
# (float32: the `bf16` recipe quantizes nothing and CPU training has no autocast), fp8_hybrid, e5m2 and
# e3m4, two seeds each, shadow comparison every 10 steps (every logging step), then the report.
#   ALTGRAD_TINYSHAKESPEARE=/path/to/input.txt bash recipes/readme_experiments.sh [OUT_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-runs/readme}
for recipe in bf16 fp8_hybrid e5m2 e3m4; do
  for seed in 1337 1338; do
    dir="$out/$recipe-seed$seed"
    [ -f "$dir/trainer_state.json" ] && continue
    accelerate launch --config_file accelerate_config.yaml recipes/train.py \
      --config recipes/configs/cpu_shakespeare_char.yaml \
      quantization.recipe="$recipe" quantization.shadow_every=10 \
      training.seed="$seed" training.output_dir="$dir" training.save_steps=1000 > "$dir.log" 2>&1 \
      || { echo "run $dir failed, see $dir.log"; exit 1; }
    grep "final val_loss" "$dir.log"
  done
done
python recipes/compare.py "$out"/*-seed*/ --baseline "$out/bf16-seed1337" --out "$out/report"
