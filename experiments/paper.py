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
instruct   Question-answer pairs from the training scenes (data/qa.py; never from test or probe images), a
           short instruction-tuning run (train.py --init-from) from each pre-trained NTP and PRIOR checkpoint,
           then, on questions about the test scenes, exact match of the greedily generated answer
           (qa_eval.qa_generate, KV-cached model.generate) next to the likelihood evaluation of the same
           checkpoints (the same questions as multiple choice; probes and token NLL with eval.py). The loss
           is on the answer tokens only (--it-loss answer, the default: a score file with p_ref = 1 on the
           question and 0 on the answer makes --loss prior a masked loss, data/qa.answer_only_scores) or on
           the whole "question: ... answer: ..." text (--it-loss all: plain NTP).
"""
import argparse
import sys

from experiments.paper_ablation import ablation
from experiments.paper_baselines import baselines
from experiments.paper_instruct import instruct
from experiments.paper_scaling import scaling


def parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)

    def common(sp):
        sp.add_argument("--from", dest="from_dir", default="out", help="the main job's output folder (default: out)")
        sp.add_argument("--out", default="", help="where to write (default: <from>/paper/<command>)")
        sp.add_argument("--mix", default="", help="caption mix (default: the main job's first)")
        sp.add_argument("--arch", default="h", choices=["h", "u"], help="model family (default: h)")
        sp.add_argument("--seeds", type=int, default=0, help="seeds per arm (0 = the command's default)")
        sp.add_argument("--steps", type=int, default=0, help="training steps (0 = the preset's; --quick: 2)")
        sp.add_argument("--batch-size", type=int, default=0, help="samples per step (0 = the preset's)")
        sp.add_argument("--lr", type=float, default=0, help="one learning rate for every arm (0 = chosen_lrs.json)")
        sp.add_argument("--eval-rows", type=int, default=None,
                        help="rows per probe file and test captions (default: the preset's; --quick: 8)")
        sp.add_argument("--parallel", type=int, default=0,
                        help="runs at once (0 = the main job's; 1 = in this process, what --quick uses)")
        sp.add_argument("--device", default="", help="auto, cpu or cuda (default: the main job's)")
        sp.add_argument("--quick", action="store_true",
                        help="a seconds-long end-to-end check with tiny settings (tests)")
        sp.add_argument("--plan", action="store_true", help="print what would run and the time estimate, then stop")
        return sp

    a = common(sub.add_parser("ablation", help="Fig. 5: PRIOR's alpha and the factor k, next to NTP"))
    a.add_argument("--alphas", default="0.5,1,2,4", help="PRIOR exponents (default: the paper's 0.5,1,2,4)")
    a.add_argument("--no-reuse", action="store_true",
                   help="train NTP and PRIOR alpha 1 here too, not reuse the main job's runs")
    sc = common(sub.add_parser("scaling", help="Figs. 6-7: power-law fits over data size"))
    sc.add_argument("--sizes", default="",
                    help="subset sizes in records, comma-separated (default: 6 log-spaced over 10x up to all)")
    sc.add_argument("--epochs", type=float, default=1.0, help="passes over each subset (default 1: D = data size)")
    sc.add_argument("--methods", default="ntp,prior")
    sc.add_argument("--targets", default="probe_avg,nll_image",
                    help="benchmarks to fit (positive values; default: probe_avg,nll_image)")
    bl = common(sub.add_parser("baselines", help="Table 1: the paper's baselines, Rho-1 and CAL, each at its best lr"))
    bl.add_argument("--arms", default="rare,attn,itm,itc,recon,rho1,cal", help="baselines to run (default: all)")
    bl.add_argument("--lrs", default="",
                    help="lr grid for the baselines, comma-separated (default: the preset's, the main job's grid)")
    it = common(sub.add_parser("instruct", help="instruction tuning on scene QA, generated-answer exact match"))
    it.add_argument("--methods", default="ntp,prior")
    it.add_argument("--it-steps", type=int, default=0,
                    help="instruction-tuning steps (0 = 100; the paper: 20; --quick: 3)")
    it.add_argument("--it-lr", type=float, default=1e-3, help="instruction-tuning peak lr")
    it.add_argument("--it-train", default="all", choices=["all", "projector"], help="what tunes (default: all weights)")
    it.add_argument("--it-loss", default="answer", choices=["answer", "all"],
                    help="loss on the answer only (default) or the whole text")
    it.add_argument("--per-scene", type=int, default=2, help="training questions per training scene")
    it.add_argument("--qa-rows", type=int, default=0, help="test questions per kind (0 = 100; --quick: 8)")
    return p


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser().parse_args(argv)
    args.argv = argv
    return {"ablation": ablation, "baselines": baselines, "scaling": scaling, "instruct": instruct}[args.command](args)


if __name__ == "__main__":
    main()
