"""What each script's flags may be: ranges and cross-checks, as mixins of the scripts' config dataclasses
(`class TrainConfig(TrainChecks)`), so a script keeps its fields and this file the rules. lib.cli.validate calls
check() on the command line's values (parse_config, run); a config built in code (tests) is not checked.

    python train.py --steps 0      # error: --steps 0: allowed values are an integer >= 1 (optimizer steps)

Each rule is one line here: check_ranges(name=min or (min, max)), check_warmup (--warmup below --steps),
check_divisible (attention heads split the width). A float with a bound must be finite (no nan, no inf).
"""
from lib.cli import check_divisible, check_ranges, check_warmup

FRACTION = (0.0, 1.0)


class TrainChecks:
    def check(self):
        check_ranges(self, steps=1, batch_size=1, micro_batch=0, row_len=1, warmup=0, lr=0.0, alpha=0.0, save_every=1,
                     image_size=1, patch_size=1, vit_dim=1, vit_depth=1, vit_heads=1, n_layer=1, n_head=1, d_model=1,
                     weight_decay=0.0, grad_clip=0.0, text_ratio=0.0, aux_weight=0.0, rho1_keep=FRACTION,
                     oracle_low=FRACTION, itc_dim=1, stop_at=0, max_bad_fraction=FRACTION, workers=0, threads=0,
                     peak_tflops=0.0)
        check_warmup(self)
        check_divisible(self, "d_model", "n_head")
        check_divisible(self, "vit_dim", "vit_heads")


class RefChecks:
    def check(self):
        check_ranges(self, val_fraction=FRACTION, n_layer=1, n_head=1, d_model=1, row_len=2, batch_rows=1, steps=0,
                     lr=0.0, warmup=0, weight_decay=0.0, eval_every=0, patience=0, max_bad_fraction=FRACTION,
                     max_epochs=1e-9)
        if self.steps:  # --steps 0: sized to the data, and the warm-up with it (reference_lm.size_steps)
            check_warmup(self)
        check_divisible(self, "d_model", "n_head")


class ScoreChecks:
    def check(self):
        check_ranges(self, row_len=1, batch_rows=1, chunk=1, report_captions=0, max_bad_fraction=FRACTION)


class EvalChecks:
    def check(self):
        check_ranges(self, max_rows=0, row_len=1, batch_rows=1, max_bad_fraction=FRACTION, threads=0)


class VisionChecks:
    def check(self):
        check_ranges(self, val_fraction=FRACTION, image_size=1, patch_size=1, vit_dim=1, vit_depth=1, vit_heads=1,
                     steps=1, batch_size=1, lr=0.0, warmup=0, weight_decay=0.0, grad_clip=0.0, pixel_noise=0.0,
                     eval_every=0, max_bad_fraction=FRACTION, workers=0, threads=0)
        check_warmup(self)
        check_divisible(self, "vit_dim", "vit_heads")
        check_divisible(self, "image_size", "patch_size")


class TokenizerChecks:
    SMALLEST_VOCAB = 7 + 256  # byte-level BPE starts from the 7 specials (data/tokenizer.SPECIALS) and all 256 bytes

    def check(self):
        check_ranges(self, vocab_size=self.SMALLEST_VOCAB, max_bad_fraction=FRACTION)


class AttnChecks:
    def check(self):
        check_ranges(self, image_size=1, patch_size=1, vit_dim=1, vit_depth=1, vit_heads=1, d_model=1, n_layer=0,
                     n_head=1, steps=1, batch_size=1, lr=0.0, budget=0.0, threads=0, max_bad_fraction=FRACTION,
                     workers=0)
        check_divisible(self, "d_model", "n_head")
        check_divisible(self, "vit_dim", "vit_heads")
