"""The job runner of the experiment drivers (experiments/main.py, experiments/paper.py). A job is one of the
project's scripts given as (its config object, its module): the drivers build the config (train.TrainConfig(...),
eval.EvalConfig(...), dataclasses.replace on a base one) and this file runs it, in a subprocess on its share of the
cores (OMP_NUM_THREADS), its output in a log file of its own; chains of jobs run --parallel at a time; a failed job
stops the run with the last lines of its log.

    jobs = Jobs("out/logs", parallel=2, nproc=1)
    jobs.run((eval.EvalConfig(run_dir=d), "eval"), "eval_x")                    # one job -> out/logs/eval_x.log
    jobs.run_chains([[((train_cfg, "train"), "train_x"), ((eval_cfg, "eval"), "eval_x")], ...])  # 2 at a time

A subprocess gets the config back as flags (flags(cfg): only the fields off their defaults), launched as
`python -m experiments SCRIPT ...` for the core scripts of LAB (the script with every lab plug-in) and as
`python -m MODULE ...` for the others. With in_process=True (paper.py's --parallel 1) the modules of IN_PROCESS run
in this process instead, one after the other: their function is called with the config (checked(cfg): what
parse_config would have made of those flags), no start-up cost per job. With workers=True (the main job) each
chain runs in one of --parallel worker processes started once (spawn), each on its share of the threads: the
modules of IN_PROCESS and ("call", "module:function", args) jobs run there without a new interpreter, torch import
or data read per job. Every job's time goes into Jobs.timings (name, kind, seconds; a "call" job's own split when
it returns one).
"""
import contextlib
import dataclasses
import importlib
import multiprocessing
import os
import subprocess
import sys
import time
import typing
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, ThreadPoolExecutor, wait

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The modules a job can run in this process: module -> the function that takes its config.
IN_PROCESS = {"train": "main", "eval": "main", "score": "main", "reference_lm": "train_lm", "tools.vision": "main",
              "experiments.importance": "main", "baselines.attention": "train_attention_scorer"}
LAB = ("train", "eval", "score", "reference_lm")  # core scripts a subprocess runs as `python -m experiments SCRIPT`


def _default(f):
    if f.default is not dataclasses.MISSING:
        return f.default
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else dataclasses.MISSING


def changed(cfg):
    """{field: value} of the fields of cfg off their defaults (a positional field has none: always there)."""
    return {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg) if getattr(cfg, f.name) != _default(f)}


def flags(cfg):
    """The command line utils.parse_config reads back as cfg: `--some-name value` for each field off its default
    (a boolean as `--flag true` / `--flag false`), positional fields first, in field order."""
    from utils import option
    given, positional, named = changed(cfg), [], []
    for f in dataclasses.fields(cfg):
        if f.name not in given:
            continue
        value = given[f.name]
        if value is None:
            raise ValueError(f"{option(f.name)}: None is a default only, no command line gives it")
        text = str(value).lower() if isinstance(value, bool) else str(value)
        if f.metadata.get("positional"):
            positional.append(text)
        else:
            named += [option(f.name), text]
    return positional + named


def checked(cfg):
    """A copy of cfg as parse_config makes it from flags(cfg): each value of the field's type (an int lr becomes
    a float), the fields' min..max and the config's check() applied, `_given` = the fields off their defaults."""
    from utils import validate
    hints, kw = typing.get_type_hints(type(cfg)), {}
    for name, value in changed(cfg).items():
        kind = hints[name]
        kind = typing.get_args(kind)[0] if typing.get_origin(kind) is typing.Union else kind  # Optional[x]: x
        if value is not None and kind in (int, float, str) and type(value) is not kind:
            kw[name] = kind(str(value))
    cfg = dataclasses.replace(cfg, **kw)
    return validate(cfg, changed(cfg))


def command(job):
    """A (config, module) job's arguments after `python`: `-m experiments SCRIPT` for LAB, else `-m MODULE`."""
    cfg, module = job
    return ["-m", *(["experiments"] if module in LAB else []), module, *flags(cfg)]


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


def _link(job):
    """("link", src, dst): hard-link a finished checkpoint (once)."""
    if not os.path.exists(job[2]):
        os.link(job[1], job[2])


def _worker_chain(jobs_, chain, threads=None):
    """A chain in a worker process: [(name, kind, seconds, returned split or None)] of its jobs. threads: the
    torch threads its jobs run on here (in process), and the OMP threads of any it starts as a subprocess."""
    import torch
    done, before = [], torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        for job, name in chain:
            if job[0] == "link":
                _link(job)
                continue
            t0 = time.perf_counter()
            split = _call(job, jobs_.log_path(name)) if job[0] == "call" else jobs_.run(job, name, threads)
            done.append((name, jobs_.kind(job), time.perf_counter() - t0, split if isinstance(split, dict) else None))
    finally:
        torch.set_num_threads(before)  # the worker's own share again, for the next chain
    return done


def fail(cmd, log):
    tail = open(log).read()[-2500:] if os.path.exists(log) else ""
    raise SystemExit(f"step failed: {' '.join(cmd)}\n--- last lines of {log} ---\n{tail}")


class Jobs:
    def __init__(self, log_dir, parallel=1, nproc=1, record=None, in_process=False, workers=False):
        """log_dir: one <name>.log per job; parallel: jobs at once; nproc: processes per train.py run (torchrun);
        record: an open file that gets every command line; in_process: run IN_PROCESS's modules here; workers:
        run chains in --parallel worker processes (IN_PROCESS modules and "call" jobs in process there)."""
        self.log_dir, self.parallel, self.nproc = log_dir, max(1, parallel), nproc
        self.record, self.in_process, self.workers = record, in_process, workers and nproc == 1
        self.threads = max(1, (os.cpu_count() or 2) // max(1, parallel))
        self.timings = []  # (name, kind, seconds, split) of every job run so far
        self._pool = None

    def kind(self, job):
        return job[1].split(":")[0] if job[0] == "call" else job[1]

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

    def run(self, job, log_name, threads=None):
        """Run a (config, module) job in a subprocess (here with in_process); its output goes to a log file under
        out/logs."""
        if self.in_process:
            return self._in_process(job, log_name)
        env = {**os.environ, "OMP_NUM_THREADS": str(threads or self.threads_per_process(job))}
        log_path = self.log_path(log_name)
        cmd = [sys.executable, *self.launcher(job), *command(job)]
        if self.record is not None:
            self.record.write(" ".join(cmd) + "\n")
            self.record.flush()
        with open(log_path, "w") as log:
            done = subprocess.run(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        if done.returncode != 0:
            fail(cmd, log_path)
        return log_path

    def threads_per_process(self, job):
        """A run's share of the cores, split again over its torchrun processes: cores // parallel // nproc."""
        return max(1, self.threads // (self.nproc if self.launcher(job) else 1))

    def launcher(self, job):
        """train.py runs under torchrun when --nproc > 1 (DDP: NCCL on GPUs, gloo on CPU); the rest run plainly."""
        if job[1] == "train" and self.nproc > 1:
            return ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={self.nproc}"]
        return []

    def _in_process(self, job, name):
        """Run a job of IN_PROCESS's modules by calling its function with the checked config; output into its log."""
        cfg, module = job
        if module not in IN_PROCESS:
            raise ValueError(module)
        function = getattr(importlib.import_module(module), IN_PROCESS[module])
        cfg = checked(cfg)
        log = self.log_path(name)
        with open(log, "w") as f, contextlib.redirect_stdout(f), contextlib.redirect_stderr(f):
            try:
                function(cfg)
            except (Exception, SystemExit) as e:
                import traceback
                traceback.print_exc(file=f)
                failed = e
            else:
                failed = None
        if failed is not None:
            fail(["python", *command(job)], log)
        return log

    def run_chains(self, jobs, threads=None):
        """Run chains of jobs --parallel at a time, each on cpu_threads // parallel threads (never more threads
        than cores: an oversubscribed OpenMP pool slows a run many times over). A chain is a list of (job, log
        name), run one after the other; ("link", src, dst) hard-links a finished checkpoint. threads: each
        job's threads (default: threads_per_process). In process, every job runs here, in order, no bar."""
        chains = [j if isinstance(j, list) else [j] for j in jobs]

        def run_chain(chain, bar=None):
            for job, name in chain:
                if job[0] == "link":
                    _link(job)
                else:
                    self.run(job, name, threads)
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
                        running.add(self.pool().submit(_worker_chain, self, pending.pop(0), threads))
                    done, running = wait(running, return_when=FIRST_COMPLETED)
                    for f in done:
                        self.timings += f.result()  # a failed job raises here: nothing more is submitted
                        bar.update()
            return
        with ThreadPoolExecutor(self.parallel) as pool, \
                tqdm(total=sum(map(len, chains)), desc="  jobs", leave=False) as bar:
            for f in [pool.submit(run_chain, c, bar) for c in chains]:
                f.result()
