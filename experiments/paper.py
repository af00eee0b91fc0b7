"""The paper's ablation, scaling and instruction-tuning experiments on the built-in data: one command each,
reusing what the main job (main.py) left in its output folder.

    python -m experiments.paper ablation [--from out] [--arch h] [--seeds 3]  # Fig. 5: alpha in {0.5, 1, 2, 4}, no k
    python -m experiments.paper baselines [--from out] [--arch h]     # Table 1: ITM, ITC, recon, attn, rare, Rho-1, CAL
    python -m experiments.paper scaling  [--from out] [--sizes 800,1600,...]  # Figs. 6-7: L(D) = (D / D_c)^alpha_D
    python -m experiments.paper instruct [--from out]                 # instruction tuning, generated answers
    python -m experiments.paper <command> --plan                      # what it would run, and an estimate
    python -m experiments.paper <command> --quick                     # seconds: a check on smoke artefacts

Each writes <from>/paper/<command>/results.md (paper/<command>_u/ for --arch u, _<mix> for another mix than
the main job's first), results.json, a PNG and its runs (train.py / eval.py
outputs) and logs; a re-run skips the finished runs, as main.py does. What it reads from --from:
experiment_config.json (the preset the artefacts were made with), data_<mix>/, tokenizer.json,
scores_<mix>_{train,test}.pt, ref_lm_<mix>.pt (scaling), base_lm.pt and vit.pt (H-LVLM),
runs/<mix>/u_stage1 (U-LVLM), chosen_lrs.json (each loss's learning rate, chosen by the main job's grid on
validation captions), and the main runs runs/<mix>/<arch>/<loss>_lr<lr>_s<seed> where they exist.

ablation   PRIOR with alpha in --alphas and PRIOR without the factor k (train.py --no-k), next to NTP, at the
           chosen lrs (PRIOR's lr for every PRIOR variant), --seeds seeds, --steps steps; the final checkpoint
           evaluated by eval.py exactly as the main job evaluates (probes, token NLL, grounding gap). The
           main job's NTP and PRIOR (alpha 1) runs are reused when their settings match (--no-reuse: never).
baselines  Table 1: rare-word weighting, attention weighting (token weights from a small contrastive model on
           the same captions, baselines/attention.py, standing in for CLIP), NTP + ITM / ITC / reconstruction, and Rho-1
           and CAL (not in the paper), each in the main job's recipe. Each gets its own lr: the preset's grid
           at seed 0, chosen by the validation probes (as the main job chooses NTP's and PRIOR's), then the
           other seeds there; next to the main job's NTP, PRIOR and oracle runs (reused), evaluated as they
           were. Also: how well PRIOR's and the attention scorer's weights find the image words.
scaling    NTP and PRIOR trained for --epochs epochs on nested subsets of train.jsonl (its first n records;
           default 6 sizes, log-spaced over 10x up to all of it), each with its own cosine schedule. D = the
           caption tokens (with <|eos|>) the run's batches hold, counted exactly with data.packing.global_batch.
           PRIOR needs p_ref for each subset: score.py is run on every subset file with the main job's
           reference LM (same model, same tokenizer; the subset gets its own data fingerprint), and the
           largest difference to the full file's scores is reported. Per method and --targets benchmark,
           log y = alpha_D log D - alpha_D log D_c is fitted by least squares over every run (seeds as
           separate points); alpha_D gets a 95% interval from the regression's standard error (t, n - 2 dof)
           and from a bootstrap over runs; the fit on all but the largest size predicts the largest, and the
           relative error of that prediction is reported.
instruct   Question-answer pairs from the training scenes (benchmarks/qa.py; never from test or probe images), a
           short instruction-tuning run (train.py --init-from) from each pre-trained NTP and PRIOR checkpoint,
           then, on questions about the test scenes, exact match of the greedily generated answer
           (qa_eval.qa_generate, KV-cached model.generate) next to the likelihood evaluation of the same
           checkpoints (the same questions as multiple choice; probes and token NLL with eval.py). The loss
           is on the answer tokens only (--it-loss answer, the default: a score file with p_ref = 1 on the
           question and 0 on the answer makes --loss prior a masked loss, data/qa.answer_only_scores) or on
           the whole "question: ... answer: ..." text (--it-loss all: plain NTP).
"""
import sys
import typing
from dataclasses import dataclass

from experiments.paper_ablation import ablation
from experiments.paper_baselines import baselines
from experiments.paper_instruct import instruct
from experiments.paper_scaling import scaling
from utils import UserError, flag, run


@dataclass
class PaperConfig:
    """Every command's flags."""
    from_: str = flag("out", "the main job's output folder")
    out: str = flag("", "where to write (empty: <from>/paper/<command>)")
    mix: str = flag("", "caption mix (empty: the main job's first)")
    arch: str = flag("h", "model family", ["h", "u"])
    seeds: int = flag(0, "seeds per arm (0 = the command's default)")
    steps: int = flag(0, "training steps (0 = the preset's; --quick: 2)")
    batch_size: int = flag(0, "samples per step (0 = the preset's)")
    lr: float = flag(0.0, "one learning rate for every arm (0 = chosen_lrs.json)")
    eval_rows: typing.Optional[int] = flag(None, "rows per probe file and test captions (None: the preset's; "
                                                 "--quick: 8)")
    parallel: int = flag(0, "runs at once (0 = the main job's; 1 = in this process, what --quick uses)")
    device: str = flag("", "auto, cpu or cuda (empty: the main job's)")
    quick: bool = flag(False, "a seconds-long end-to-end check with tiny settings (tests)")
    plan: bool = flag(False, "print what would run and the time estimate, then stop")
    argv = None  # the command line, for the report's header (not a flag)

    @property
    def from_dir(self):
        return self.from_


@dataclass
class AblationConfig(PaperConfig):
    """Fig. 5: PRIOR's alpha and the factor k, next to NTP."""
    alphas: str = flag("0.5,1,2,4", "PRIOR exponents (the paper's 0.5,1,2,4)")
    no_reuse: bool = flag(False, "train NTP and PRIOR alpha 1 here too, not reuse the main job's runs")
    command = "ablation"


@dataclass
class ScalingConfig(PaperConfig):
    """Figs. 6-7: power-law fits over data size."""
    sizes: str = flag("", "subset sizes in records, comma-separated (empty: 6 log-spaced over 10x up to all)")
    epochs: float = flag(1.0, "passes over each subset (1: D = data size)")
    methods: str = flag("ntp,prior", "methods to train, comma-separated")
    targets: str = flag("probe_avg,nll_image", "benchmarks to fit (positive values), comma-separated")
    command = "scaling"


@dataclass
class BaselinesConfig(PaperConfig):
    """Table 1: the paper's baselines, Rho-1 and CAL, each at its best lr."""
    arms: str = flag("rare,attn,itm,itc,recon,rho1,cal", "baselines to run, comma-separated (all of them)")
    lrs: str = flag("", "lr grid for the baselines, comma-separated (empty: the preset's, the main job's grid)")
    command = "baselines"


@dataclass
class InstructConfig(PaperConfig):
    """Instruction tuning on scene QA, generated-answer exact match."""
    methods: str = flag("ntp,prior", "pre-trained methods to tune, comma-separated")
    it_steps: int = flag(0, "instruction-tuning steps (0 = 100; the paper: 20; --quick: 3)")
    it_lr: float = flag(1e-3, "instruction-tuning peak lr")
    it_train: str = flag("all", "what tunes (all weights or the projector)", ["all", "projector"])
    it_loss: str = flag("answer", "loss on the answer only or the whole text", ["answer", "all"])
    per_scene: int = flag(2, "training questions per training scene")
    qa_rows: int = flag(0, "test questions per kind (0 = 100; --quick: 8)")
    command = "instruct"


COMMANDS = {"ablation": (ablation, AblationConfig), "baselines": (baselines, BaselinesConfig),
            "scaling": (scaling, ScalingConfig), "instruct": (instruct, InstructConfig)}


def command_of(argv):
    """The command argv[0] names and its config class; `--help` alone prints this file's docstring."""
    if argv[:1] in (["-h"], ["--help"]):
        print(__doc__)
        raise SystemExit(0)
    if not argv or argv[0] not in COMMANDS:
        raise UserError(f"the first argument is the command, one of {', '.join(COMMANDS)} "
                        f"(got {repr(argv[0]) if argv else 'nothing'}; --help says what each does)")
    return COMMANDS[argv[0]]


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        command, cls = command_of(argv)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None

    def go(cfg):
        cfg.argv = argv
        return command(cfg)
    return run(go, cls, argv[1:], description=f"python -m experiments.paper {argv[0]}: {cls.__doc__}")


if __name__ == "__main__":
    main()
