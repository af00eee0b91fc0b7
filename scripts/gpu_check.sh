#!/usr/bin/env bash
# The GPU checks of docs/gpu.md in one go, on a machine with one CUDA GPU (bf16: A100 or newer):
#     bash scripts/gpu_check.sh [OUT]          # results in OUT (default out/gpu_check), summary at the end
# 1. bench/bench.py at the bench and gpu presets, H and U, with and without --compile (JSON per run; --profile once)
# 2. the sync tests: the CPU proxy (tests/test_gpu_ready.py), then a real train step on the GPU under
#    torch.cuda.set_sync_debug_mode("warn"), which reports every synchronising CUDA call
# 3. 50 steps of experiments/main.py's gpu preset VLM for H and U (train.py --compile): step time, MFU, peak memory
# Extra flags for bench/bench.py and train.py (e.g. --peak-tflops 835 for a GPU flops.PEAK_BF16 does not know): PEAK=...
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-out/gpu_check}
PY=${PY:-python}
PEAK=${PEAK:+--peak-tflops $PEAK}
mkdir -p "$OUT"
$PY -c "import torch; assert torch.cuda.is_available(), 'no CUDA GPU'; print(torch.cuda.get_device_name(0))" \
    | tee "$OUT/device.txt"

echo "== 1. bench/bench.py"
for preset in bench gpu; do
  for arch in h u; do
    for compile in "" "--compile"; do
      name="bench_${preset}_${arch}${compile:+_compile}"
      $PY -m bench.bench --preset $preset --arch $arch $compile $PEAK --json "$OUT/$name.json" 2>&1 | tee "$OUT/$name.log"
    done
  done
done
$PY -m bench.bench --preset gpu --profile $PEAK --json "$OUT/bench_gpu_h_profile.json" 2>&1 \
    | tee "$OUT/bench_gpu_h_profile.log"

echo "== 2. syncs"
$PY -m pytest -q tests/test_gpu_ready.py 2>&1 | tee "$OUT/test_gpu_ready.log"
$PY - <<'PY' 2>&1 | tee "$OUT/sync_cuda.log"
import warnings, torch, train
from tests.test_gpu_ready import tiny_data, tiny_model
for arch in "hu":
    model = tiny_model(arch).cuda()
    cfg = train.TrainConfig(arch=arch, loss="prior", batch_size=8, micro_batch=4, row_len=64, device="cuda")
    data = tiny_data(model)
    train.train_step(cfg, 0, model, data, "cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train.train_step(cfg, 1, model, data, "cuda")
    torch.cuda.set_sync_debug_mode(0)
    syncs = [str(w.message).splitlines()[0] for w in caught if "synchroniz" in str(w.message)]
    print(f"{arch}: {len(syncs)} synchronising CUDA calls in one train step (expected 1: the statistics)")
    for s in syncs:
        print("   ", s)
PY

echo "== 3. 50 steps of the gpu preset, H and U"
DATA="$OUT/data"
if [ ! -f "$DATA/synth/train.jsonl" ]; then
  $PY -m world.generate --out "$DATA/synth" --n-train 20000 --n-ref 20000 --n-text 20000 --n-label 0 --n-val 0 \
      --n-test 0 --n-probe 0 > "$OUT/generate.log" 2>&1
  $PY -m data.tokenizer --data "$DATA/synth/ref.jsonl,$DATA/synth/train.jsonl" --out "$DATA/tok.json" --vocab-size 2048
fi
for arch in h u; do
  extra=""
  [ $arch = u ] && extra="--text-data $DATA/synth/text.jsonl"
  $PY - "$arch" "$DATA" "$OUT/train_$arch" $extra $PEAK <<'PY' 2>&1 | tee "$OUT/train_$arch.log"
import json, statistics, sys, torch, train
import scale  # noqa: F401 (FLOP/s and MFU in the log: scale/flops.py)
from utils import parse_config
arch, data, out, *extra = sys.argv[1:]
cfg = parse_config(train.TrainConfig, argv=[
    "--arch", arch, "--data", f"{data}/synth/train.jsonl", "--tokenizer", f"{data}/tok.json", "--out-dir", out,
    "--loss", "ntp", "--d-model", "512", "--n-layer", "8", "--n-head", "8", "--patch-size", "16",
    "--batch-size", "256", "--row-len", "128", "--steps", "50", "--warmup", "10", "--save-every", "1000",
    "--compile", "--device", "cuda", *extra])
train.main(cfg)
lines = [json.loads(l) for l in open(f"{out}/log.jsonl")][10:]  # after compiling and warming up
res = {"arch": arch, "step_s": statistics.median(l["seconds"] for l in lines),
       "mfu": statistics.median(l["mfu"] for l in lines) if "mfu" in lines[0] else None,
       "tokens_per_s": statistics.median(l["tokens_per_s"] for l in lines),
       "peak_memory_gib": torch.cuda.max_memory_allocated() / 2 ** 30}
print(json.dumps(res))
json.dump(res, open(f"{out}.json", "w"))
PY
done

echo "== summary"
for f in "$OUT"/bench_*.json; do
  $PY -c "import json,sys; r=json.load(open(sys.argv[1])); print(sys.argv[1].split('/')[-1], \
'step %.1f ms' % (r['train_step_s_prior'] * 1e3), 'MFU', r['mfu'], 'peak %.0f MB' % r['peak_memory_mb'])" "$f"
done
cat "$OUT"/train_*.json; echo
grep -h "synchronising" "$OUT/sync_cuda.log"
