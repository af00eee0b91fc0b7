"""How long a packed row should be for a caption set: sample lengths, and the attention a training step computes
(whole rows under a mask) over the attention the documents need (causal, inside each document), per row_len;
with the FLOP counts at the main job's gpu preset (d 512 x 8 layers). docs/gpu.md has the numbers.

    python -m world.generate --out /tmp/g/synth --n-train 3000 --n-ref 3000 --n-text 0 --n-label 0 --n-val 0 \\
        --n-test 0 --n-probe 0
    python -m bench.row_len /tmp/g/synth/train.jsonl /tmp/g/synth/ref.jsonl
"""
import statistics
import sys

from data import tokenizer as T
from data.packing import IGNORE, pack
from data.records import read_records
from model import VLM, DecoderConfig, VLMConfig
from data.packing import global_batch, make_samples
from scale.flops import step_flops
from scale.flops import attended_pairs

if len(sys.argv) != 3:
    raise SystemExit("usage: python -m bench.row_len TRAIN.jsonl REF.jsonl (captions to tokenize with)")
recs = read_records(sys.argv[1])
ref = read_records(sys.argv[2], require_image=False, check_files=False)
tok = T.train_tokenizer([r.caption for r in ref + recs], 2048)
samples = make_samples(tok, recs)
lens = sorted(len(s.caption_ids) + 2 for s in samples)  # <|bos|> caption <|eos|>
print(f"caption tokens with bos and eos: median {statistics.median(lens)}, p99 {lens[int(.99 * len(lens))]}, "
      f"max {lens[-1]}")
for arch in ("h", "u"):
    model = VLM(VLMConfig(arch=arch, patch_size=16, decoder=DecoderConfig(vocab_size=2048, n_layer=8, n_head=8,
                                                                           d_model=512, max_seq_len=1024)))
    prefix = model.image_tokens()
    for row_len in (1024, 512, 256, 128):
        computed = needed = dense = flops = 0
        for step in range(8):
            b = pack([samples[i] for i in global_batch(step, len(samples), 256, 0)], row_len, prefix, tight=True)
            L = b.input_ids.shape[1]
            real = b.input_ids != T.PAD
            n, labelled = int(real.sum()), int((b.labels != IGNORE).sum())
            pairs = attended_pairs(b.doc_ids, real)
            computed, needed = computed + n * L, needed + pairs
            dense += step_flops(model, n, labelled, 256, L)
            flops += step_flops(model, n, labelled, 256, pairs / n)
        print(f"{arch} ({len(prefix)} image tokens) row_len {row_len}: attention computed / needed "
              f"{computed / needed:.1f}x; FLOPs counted over whole rows / needed {dense / flops:.3f}")
