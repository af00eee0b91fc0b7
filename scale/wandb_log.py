"""--wandb PROJECT (the plug-in "wandb" of utils.RunLog, for train.py, and of reference_lm.py): the log's lines and
the run's config in Weights & Biases too (nanoGPT's convention); log.jsonl is written either way.

    python -m scale train ... --wandb prior-runs                      # needs: pip install -r requirements-wandb.txt
    WANDB_MODE=offline python -m scale train ... --wandb prior-runs   # no network: the run stays in OUT_DIR/wandb/
    wandb sync runs/h_prior/wandb/offline-run-*                       # later, from a machine with network

wandb is optional: it is imported only when --wandb is given, and a missing package is one line saying what to
install. Every key of every log line goes to wandb.log at that line's "step" (the same numbers as log.jsonl), and
the config dict (train.py: config.json's; reference_lm.py: its flags and decoder config) to wandb.init. The wandb
run's id is kept in OUT_DIR/wandb_id, so a --resume'd run continues the same wandb run; wandb drops steps it has
already seen (the lines after the resumed checkpoint, which log.jsonl trims and writes again).
"""
import os
import secrets

from utils import UserError, register


@register("wandb")
def start_wandb(project, config, out_dir, name=None, id_path=None):
    """A wandb run for `project` logging into out_dir/wandb (WANDB_MODE=offline: no network needed). id_path: a
    file keeping the run's id, so a resumed run continues it (None: a new run each time)."""
    try:
        import wandb
    except ImportError:
        raise UserError("--wandb needs the wandb package: pip install -r requirements-wandb.txt") from None
    run_id = open(id_path).read().strip() if id_path and os.path.exists(id_path) else secrets.token_hex(4)
    if id_path:
        with open(id_path, "w") as f:
            f.write(run_id)
    return wandb.init(project=project, config=config, dir=out_dir, id=run_id, resume="allow",
                      name=name or os.path.basename(os.path.normpath(out_dir)))
