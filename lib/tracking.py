"""A run's log: log.jsonl (one JSON line per step, always) and, with --wandb PROJECT, the same lines and the run's
config in Weights & Biases (nanoGPT's convention), for train.py and reference_lm.py.

    python train.py ... --wandb prior-runs                      # needs: pip install -r requirements-wandb.txt
    WANDB_MODE=offline python train.py ... --wandb prior-runs   # no network: the run stays in OUT_DIR/wandb/
    wandb sync runs/h_prior/wandb/offline-run-*                 # later, from a machine with network

wandb is optional: it is imported only when --wandb is given, and a missing package is one line saying what to
install. Every key of every log line goes to wandb.log at that line's "step" (the same numbers as log.jsonl), and
the config dict (train.py: config.json's; reference_lm.py: its flags and decoder config) to wandb.init. The wandb
run's id is kept in OUT_DIR/wandb_id, so a --resume'd run continues the same wandb run; wandb drops steps it has
already seen (the lines after the resumed checkpoint, which log.jsonl trims and writes again).
"""
import json
import os
import secrets

from lib.cli import UserError


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


class RunLog:
    """log.jsonl opened for appending, and the wandb run when `project` is set. write(line) writes one JSON line
    (flushed, so a killed run keeps its lines) and logs the same dict to wandb."""

    def __init__(self, path, project="", config=None, out_dir=None):
        self.file = open(path, "a")
        out_dir = out_dir or os.path.dirname(path) or "."
        self.run = start_wandb(project, config or {}, out_dir, id_path=os.path.join(out_dir, "wandb_id")) if project \
            else None

    def write(self, line):
        self.file.write(json.dumps(line) + "\n")
        self.file.flush()
        if self.run is not None:
            self.run.log(line, step=int(line["step"]))

    def close(self):
        self.file.close()
        if self.run is not None:
            self.run.finish()
            self.run = None
