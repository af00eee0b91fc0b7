"""The job runner of the experiment drivers (experiments/main.py, experiments/paper.py): each job runs one of the
project's scripts in a subprocess on its share of the cores (OMP_NUM_THREADS), its output in a log file of its
own; chains of jobs run --parallel at a time; a failed job stops the run with the last lines of its log.

    jobs = Jobs("out/logs", parallel=2, nproc=1)
    jobs.run(["eval.py", "--run-dir", d], "eval_x")                         # one job -> out/logs/eval_x.log
    jobs.run_chains([[(train_args, "train_x"), (eval_args, "eval_x")], ...])   # each chain in order, 2 at a time

With in_process=True (paper.py's --parallel 1) the scripts in IN_PROCESS run in this process instead, one after
the other: no start-up cost per job. With workers=True (the main job) each chain runs in one of --parallel worker
processes started once (spawn), each on its share of the threads: the scripts of IN_PROCESS and ("call",
"module:function", args) jobs run there without a new interpreter, torch import or data read per job. Every job's
time goes into Jobs.timings (name, kind, seconds; a "call" job's own split when it returns one).
"""
import contextlib
import importlib
import multiprocessing
import os
import subprocess
import sys
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, ThreadPoolExecutor, wait

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The scripts a job can run in this process: script (or, for ["-m", "pkg.mod", ...], the module) ->
# (module to import, its config dataclass, the function that takes that config).
IN_PROCESS = {"train.py": ("train", "TrainConfig", "main"),
              "eval.py": ("eval", "EvalConfig", "main"),
              "score.py": ("score", "ScoreConfig", "main"),
              "reference_lm.py": ("reference_lm", "RefConfig", "train_lm"),
              "tools.vision": ("tools.vision", "Config", "main"),
              "experiments.importance": ("experiments.importance", "ImportanceConfig", "main"),
              "baselines.attention": ("baselines.attention", "AttnConfig", "train_attention_scorer")}


def lab_script(args):
    """A core script's job (["train.py", ...]) as `-m experiments train ...`: the script with every lab plug-in."""
    if args[0].endswith(".py"):
        return ["-m", "experiments", args[0][:-3], *args[1:]]
    return args


def _init_worker(threads):
    import torch
    torch.set_num_threads(threads)


def _call(args, log):
    """Run ("call", "module:function", positional args) here, its output into `log`; returns its result."""
    module, function = args[1].split(":")
    with open(log, "w") as f, contextlib.redirect_stdout(f), contextlib.redirect_stderr(f):
        try:
            return getattr(importlib.import_module(module), function)(*args[2])
        except (Exception, SystemExit):
            import traceback
            traceback.print_exc(file=f)
    fail([args[1]], log)


def _worker_chain(jobs_, chain):
    """A chain in a worker process: [(name, kind, seconds, returned split or None)] of its jobs."""
    done = []
    for args, name in chain:
        if args[0] == "link":
            if not os.path.exists(args[2]):
                os.link(args[1], args[2])
            continue
        t0 = time.perf_counter()
        split = _call(args, jobs_.log_path(name)) if args[0] == "call" else jobs_.run(args, name)
        done.append((name, jobs_.kind(args), time.perf_counter() - t0, split if isinstance(split, dict) else None))
    return done


def fail(cmd, log):
    tail = open(log).read()[-2500:] if os.path.exists(log) else ""
    raise SystemExit(f"step failed: {' '.join(cmd)}\n--- last lines of {log} ---\n{tail}")


class Jobs:
    def __init__(self, log_dir, parallel=1, nproc=1, record=None, in_process=False, workers=False):
        """log_dir: one <name>.log per job; parallel: jobs at once; nproc: processes per train.py run (torchrun);
        record: an open file that gets every command line; in_process: run IN_PROCESS's scripts here; workers:
        run chains in --parallel worker processes (IN_PROCESS scripts and "call" jobs in process there)."""
        self.log_dir, self.parallel, self.nproc = log_dir, max(1, parallel), nproc
        self.record, self.in_process, self.workers = record, in_process, workers and nproc == 1
        self.threads = max(1, (os.cpu_count() or 2) // max(1, parallel))
        self.timings = []  # (name, kind, seconds, split) of every job run so far
        self._pool = None

    def kind(self, args):
        return args[1].split(":")[0] if args[0] == "call" else (args[1] if args[0] == "-m" else args[0])

    def __getstate__(self):  # what a worker needs: no pool, no open record file
        return {**self.__dict__, "_pool": None, "record": None, "workers": False,
                "in_process": self.workers or self.in_process}

    def pool(self):
        """The worker processes, started on first use and kept (spawn: a fresh interpreter, no forked threads)."""
        if self._pool is None:
            os.environ["OMP_NUM_THREADS"] = str(self.threads)
            self._pool = ProcessPoolExecutor(self.parallel, mp_context=multiprocessing.get_context("spawn"),
                                             initializer=_init_worker, initargs=(self.threads,))
        return self._pool

    def close(self):
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None

    def log_path(self, name):
        os.makedirs(self.log_dir, exist_ok=True)
        return os.path.join(self.log_dir, name + ".log")

    def run(self, args, log_name, threads=None):
        """Run one of the project's scripts in a subprocess (here with in_process); its output goes to a log file
        under out/logs."""
        if self.in_process:
            return self._in_process(args, log_name)
        env = {**os.environ, "OMP_NUM_THREADS": str(threads or self.threads_per_process(args))}
        log_path = self.log_path(log_name)
        cmd = [sys.executable, *self.launcher(args), *lab_script(args)]
        if self.record is not None:
            self.record.write(" ".join(cmd) + "\n")
            self.record.flush()
        with open(log_path, "w") as log:
            done = subprocess.run(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        if done.returncode != 0:
            fail(cmd, log_path)
        return log_path

    def threads_per_process(self, args):
        """A run's share of the cores, split again over its torchrun processes: cores // parallel // nproc."""
        return max(1, self.threads // (self.nproc if self.launcher(args) else 1))

    def launcher(self, args):
        """train.py runs under torchrun when --nproc > 1 (DDP: NCCL on GPUs, gloo on CPU); the rest run plainly."""
        if args[0] == "train.py" and self.nproc > 1:
            return ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={self.nproc}"]
        return []

    def _in_process(self, args, name):
        """Run a script of IN_PROCESS by calling its function with its parsed flags; output into its log."""
        from utils import parse_config
        script, argv = (args[1], args[2:]) if args[0] == "-m" else (args[0], args[1:])
        if script not in IN_PROCESS:
            raise ValueError(script)
        module, config, function = IN_PROCESS[script]
        mod = importlib.import_module(module)
        cfg = parse_config(getattr(mod, config), argv)
        log = self.log_path(name)
        with open(log, "w") as f, contextlib.redirect_stdout(f), contextlib.redirect_stderr(f):
            try:
                getattr(mod, function)(cfg)
            except (Exception, SystemExit) as e:
                import traceback
                traceback.print_exc(file=f)
                failed = e
            else:
                failed = None
        if failed is not None:
            fail(args, log)
        return log

    def run_chains(self, jobs, threads=None):
        """Run chains of jobs --parallel at a time, each on cpu_threads // parallel threads (never more threads
        than cores: an oversubscribed OpenMP pool slows a run many times over). A chain is a list of (args, log
        name), run one after the other; ("link", src, dst) hard-links a finished checkpoint. threads: each
        job's OMP threads (default: threads_per_process). In process, every job runs here, in order, no bar."""
        chains = [j if isinstance(j, list) else [j] for j in jobs]

        def run_chain(chain, bar=None):
            for args, name in chain:
                if args[0] == "link":
                    if not os.path.exists(args[2]):
                        os.link(args[1], args[2])
                else:
                    self.run(args, name, threads)
                if bar is not None:
                    bar.update()
        if self.in_process:
            for c in chains:
                run_chain(c)
            return
        from tqdm import tqdm
        if self.workers:  # at most --parallel chains handed to the workers at once: after a failure none starts
            pending, running = list(chains), set()
            with tqdm(total=len(chains), desc="  runs", leave=False) as bar:
                while pending or running:
                    while pending and len(running) < self.parallel:
                        running.add(self.pool().submit(_worker_chain, self, pending.pop(0)))
                    done, running = wait(running, return_when=FIRST_COMPLETED)
                    for f in done:
                        self.timings += f.result()  # a failed job raises here: nothing more is submitted
                        bar.update()
            return
        with ThreadPoolExecutor(self.parallel) as pool, \
                tqdm(total=sum(map(len, chains)), desc="  jobs", leave=False) as bar:
            for f in [pool.submit(run_chain, c, bar) for c in chains]:
                f.result()
