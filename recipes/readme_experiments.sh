#!/usr/bin/env bash
# Reproduces the results table in README.md: nanoGPT's CPU Shakespeare-char model with the float32
# baseline (`fp32`: nothing quantized), the BF16 baseline (`bf16`: every Linear's GEMM operands in BF16,
# what bf16 autocast feeds them), fp8_hybrid, e5m2 and e3m4, two seeds each, shadow comparison every 10
# steps (every logging step), then the report.
#   ALTGRAD_TINYSHAKESPEARE=/path/to/input.txt bash recipes/readme_experiments.sh [OUT_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-runs/readme}
for recipe in fp32 bf16 fp8_hybrid e5m2 e3m4; do
  for seed in 1337 1338; do
    dir="$out/$recipe-seed$seed"
    if [ -f "$dir/trainer_state.json" ]; then
      # A finished run is reused only if it trained this recipe: a `bf16-seed*` folder from before the
      # rename trained the no-op recipe (now `fp32`).
      python -c "import sys, yaml; from altgrad.training.recipe import get_recipe, recipe_mismatch
saved = yaml.safe_load(open(sys.argv[1]))['quantization']['recipe']
sys.exit(recipe_mismatch(saved, get_recipe(sys.argv[2])) is not None or saved.get('name') != sys.argv[2])" \
        "$dir/experiment_config.yaml" "$recipe" \
        && continue
      echo "$dir holds a run of another recipe; move it away or choose another OUT_DIR"; exit 1
    fi
    accelerate launch --config_file accelerate_config.yaml recipes/train.py \
      --config recipes/configs/cpu_shakespeare_char.yaml \
      quantization.recipe="$recipe" quantization.shadow_every=10 \
      training.seed="$seed" training.output_dir="$dir" training.save_steps=1000 > "$dir.log" 2>&1 \
      || { echo "run $dir failed, see $dir.log"; exit 1; }
    grep "final val_loss" "$dir.log"
  done
done
python recipes/compare.py "$out"/*-seed*/ --baseline "$out/fp32-seed1337" --out "$out/report"
