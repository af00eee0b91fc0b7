#!/usr/bin/env bash
# Copy what the main job (bash run.sh) and experiments/paper.py wrote under out/ (git-ignored) into results/ (tracked) so
# that README can link the tables and plots our runs produced. Usage: bash results/collect.sh [out [name]]: the main
# job's folder `out` goes to results/<name> (default main; e.g. `out_more more` for other --settings).
set -euo pipefail
cd "$(dirname "$0")/.."
src=${1:-out}
dest=results/${2:-main}
[ -f "$src/results.md" ] || { echo "collect.sh: $src/results.md is missing: run the main job first (bash run.sh)" >&2; exit 1; }
rm -rf "$dest" && mkdir -p "$dest"  # nothing stale from an earlier design stays behind
# the table, the JSON it is made from (python -m experiments.report --results results/main/results.json --out results/main
# regenerates results.md byte for byte), the lr choices, the design, and each mix's data summary
cp "$src/results.md" "$src/results.json" "$src/lr_choice.json" "$src/experiment_config.json" "$dest/"
[ -f "$src/timing.json" ] && cp "$src/timing.json" "$dest/"  # where the main job's time went
for meta in "$src"/data_*/meta.json; do
    mix=$(basename "$(dirname "$meta")"); cp "$meta" "$dest/${mix}_meta.json"
done
# the plots results.md shows, and the importance-score (Fig. 8) and token-weight (Fig. 1) pictures
for png in $(grep -o '([a-z_]*\.png)' "$src/results.md" | tr -d '()') $(cd "$src" && ls importance_*.png token_weights_*.png); do
    cp "$src/$png" "$dest/"
done
for dir in "$src"/paper/*/; do  # ablation, baselines, scaling, instruct (and _u / _<mix> variants)
    name=$(basename "$dir")
    if [ -f "$dir/results.md" ]; then
        mkdir -p "results/$name"
        cp "$dir/results.md" "$dir"*.png "results/$name/"
        [ -f "$dir/results.json" ] && cp "$dir/results.json" "results/$name/"
    fi
done
echo "copied into results/: $(cd results && find . -name '*.md' -o -name '*.png' | sort | tr '\n' ' ')"
