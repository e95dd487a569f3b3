#!/usr/bin/env bash
# The main job end to end on the built-in synthetic world. Each stage adds its step here.
set -euo pipefail
OUT=${1:-demo-out}
BIN=.venv/bin
mkdir -p "$OUT"

echo "== 1. synthetic world"
$BIN/perceptio-curate synth --out "$OUT/world" --images 200 --seed 0

# --- stage: tokenizer (after the synthetic world; curation, inspect and training use $OUT/tokenizer) ---
echo "== tokenizer: fit the depth VQ-VAE on the world's ground-truth depth into $OUT/tokenizer"
# The default 800 steps (~3 min; 400 steps measured delta<1.25 0.88 instead of 0.94). One thread is
# fastest on a busy machine.
$BIN/perceptio-tokenize fit --data-root "$OUT/world" --dataset synth --depth-source gt --out "$OUT/tokenizer" --threads 1

# --- stage: curation (after the tokenizer step; TOKENIZER is the folder it wrote) ---
TOKENIZER=${TOKENIZER:-$OUT/tokenizer}
echo "== curation: RefCOCO (unc) and ADE20k of the world into $OUT/shards"
# Ground-truth depth as the teacher: the demo reaches no model hub. Drop --depth-source gt (and
# pass --depth-model) to run Depth Anything V2 instead.
$BIN/perceptio-curate refcoco --data-root "$OUT/world" --out "$OUT/shards" --tokenizer "$TOKENIZER" \
    --depth-source gt --samples-per-shard 64 --batch-size 8 --num-cpus 2
$BIN/perceptio-curate ade20k --data-root "$OUT/world" --out "$OUT/shards" --tokenizer "$TOKENIZER" \
    --depth-source gt --samples-per-shard 64 --batch-size 8 --num-cpus 2

# --- stage: inspect (runs after curation; SHARDS is the parent of the per-dataset shard folders) ---
SHARDS=${SHARDS:-$OUT/shards}
echo "== inspect: summary, validation and pictures of $SHARDS"
$BIN/perceptio-inspect summary "$SHARDS"
$BIN/perceptio-inspect validate "$SHARDS"
mkdir -p "$OUT/inspect"
for folder in "$SHARDS"/*/; do
    # The depth decoded from the tokens uses the tokenizer that dataset.json records.
    $BIN/perceptio-inspect show "$folder" --index 0 --out "$OUT/inspect/$(basename "$folder")-sample.png"
done
$BIN/perceptio-inspect grid "$SHARDS" --n 16 --out "$OUT/inspect/grid.png"

# --- stage: training (after curation; the TINY random-weight model, a short run on the demo shards) ---
RUN=$OUT/train
rm -rf "$RUN"  # the demo's own run: a second make demo trains it again (the trainer never overwrites a run)
echo "== training: TINY model, 60 steps on $SHARDS (metrics, checkpoint and export in $RUN)"
# Default loader settings: a dataset with fewer shards than readers is shared sample by sample.
$BIN/perceptio-train --shards "$SHARDS" --model tiny --tokenizer "$TOKENIZER" \
    --mix refcoco=1,ade20k=0.5 --steps 60 --save-every 30 --out "$RUN"

# --- stage: evaluation (after training; CHECKPOINT is the model folder perceptio-train exported) ---
CHECKPOINT=${CHECKPOINT:-$OUT/train/model}
echo "== evaluation: refseg, depth tokens and synthetic HardBLINK of $CHECKPOINT, one picture"
mkdir -p "$OUT/evaluate"
$BIN/perceptio-evaluate refseg --checkpoint "$CHECKPOINT" --shards "$SHARDS/refcoco-unc" --split val --limit 8 \
    --threads 1 --out "$OUT/evaluate/refseg.json"
$BIN/perceptio-evaluate depth --checkpoint "$CHECKPOINT" --shards "$SHARDS/refcoco-unc" --split val --limit 4 \
    --threads 1 --out "$OUT/evaluate/depth.json"
# Questions on a world the model never saw (another seed), in the HardBLINK layout.
$BIN/perceptio-curate synth --out "$OUT/heldout-world" --images 24 --seed 1000
$BIN/perceptio-evaluate synth-blink --world "$OUT/heldout-world" --out "$OUT/heldout-blink" --per-variant 4
$BIN/perceptio-evaluate hardblink --checkpoint "$CHECKPOINT" --data "$OUT/heldout-blink" --threads 1 \
    --out "$OUT/evaluate/hardblink.json"
$BIN/perceptio-evaluate predict --checkpoint "$CHECKPOINT" --image "$OUT/heldout-blink/images/blink3pointscenter/0.png" \
    --prompt "Multiple points are circled on the image, labeled by letters beside each circle. Which point is the closest to the camera?" \
    --threads 1 --out "$OUT/evaluate/predict.png"
echo "== evaluation: the depth-token ablation, quick version (benchmarks/ablation.py --quick)"
$BIN/python benchmarks/ablation.py --out "$OUT/ablation" --quick
