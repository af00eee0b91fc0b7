"""experiments/jobs.py: the job runner of experiments/main.py and experiments/paper.py (subprocesses with their
share of the cores and a log each, chains in order, failures naming their log, the in-process mode)."""
import importlib
import os
import sys

import pytest

from experiments import jobs


FAKE = '''
import os
from dataclasses import dataclass, field


@dataclass
class FakeConfig:
    word: str = field(default="", metadata={"help": "what to say"})
    out: str = field(default="", metadata={"help": "a file to append the word and OMP_NUM_THREADS to"})
    loud: bool = field(default=False, metadata={"help": "say it twice"})


def say(cfg):
    print("said", cfg.word, *(["said", cfg.word] if cfg.loud else []))
    if cfg.out:
        open(cfg.out, "a").write(cfg.word + os.environ["OMP_NUM_THREADS"] + ",")
    if cfg.word == "fail":
        print("the last words")
        raise ValueError("the fake script failed")


def threads(out):  # a "call" job: the torch threads it runs on
    import torch
    open(out, "a").write(f"{torch.get_num_threads()},")


if __name__ == "__main__":
    from utils import run
    run(say, FakeConfig)
'''


@pytest.fixture
def fake(tmp_path, monkeypatch):
    """A module fake_script with a config and a function, importable here and by a job's subprocess."""
    (tmp_path / "fake_script.py").write_text(FAKE)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.setitem(jobs.IN_PROCESS, "fake_script", "say")
    return importlib.import_module("fake_script")


def test_a_failing_job_names_its_log_and_shows_its_tail(tmp_path, fake):
    runner = jobs.Jobs(str(tmp_path / "logs"), parallel=2)
    with pytest.raises(SystemExit) as e:
        runner.run((fake.FakeConfig(word="fail"), "fake_script"), "bad")
    log = str(tmp_path / "logs" / "bad.log")
    assert f"--- last lines of {log} ---" in str(e.value) and "the last words" in str(e.value)
    assert str(e.value).startswith(f"step failed: {sys.executable} -m fake_script --word fail\n")


def test_chains_run_in_order_with_their_threads_and_links(tmp_path, fake):
    record = open(tmp_path / "commands.txt", "w")
    runner = jobs.Jobs(str(tmp_path / "logs"), parallel=2, record=record)
    out = tmp_path / "order.txt"

    def append(text):  # a job that appends its text and its OMP thread count to out
        return fake.FakeConfig(word=text, out=str(out)), "fake_script"
    (tmp_path / "ckpt.pt").write_text("weights")
    link = (["link", str(tmp_path / "ckpt.pt"), str(tmp_path / "l.pt")], None)
    chain = [(append("a"), "a"), (append("b"), "b"), link, (append("c"), "c")]
    runner.run_chains([chain], threads=3)
    assert out.read_text() == "a3,b3,c3,"
    assert os.path.samefile(tmp_path / "ckpt.pt", tmp_path / "l.pt")
    assert sorted(os.listdir(tmp_path / "logs")) == ["a.log", "b.log", "c.log"]
    assert (tmp_path / "logs" / "a.log").read_text() == "said a\n"
    commands = (tmp_path / "commands.txt").read_text().splitlines()
    assert commands[0] == f"{sys.executable} -m fake_script --word a --out {out}" and len(commands) == 3
    # without threads= each job gets cores // parallel
    out.unlink()
    runner.run_chains([[(append("d"), "d")]])
    assert out.read_text() == f"d{runner.threads_per_process(append('d'))},"
    record.close()
    # in the worker processes (the main job's pool) too: the base LM's chain runs alone on every core
    pooled = jobs.Jobs(str(tmp_path / "logs"), parallel=1, workers=True)
    out.unlink()
    call = (("call", "fake_script:threads", (str(out),)), "g")
    pooled.run_chains([[call]], threads=3)
    pooled.run_chains([[call]])  # the same worker, its own share again
    pooled.close()
    assert out.read_text() == f"3,{pooled.threads},"
    assert [name for name, *_ in pooled.timings] == ["g", "g"]  # and their time is counted


def test_in_process_jobs_use_the_table(tmp_path, fake):
    """In process, a job calls the function IN_PROCESS names for its module with its config; its output goes to
    its log, a failure names the log."""
    runner = jobs.Jobs(str(tmp_path / "logs"), parallel=1, in_process=True)
    runner.run_chains([((fake.FakeConfig(word="hello"), "fake_script"), "one"),
                       ((fake.FakeConfig(word="again", loud=True), "fake_script"), "two")])
    assert (tmp_path / "logs" / "one.log").read_text() == "said hello\n"
    assert (tmp_path / "logs" / "two.log").read_text() == "said again said again\n"
    with pytest.raises(SystemExit, match="step failed: python -m fake_script --word fail") as e:
        runner.run((fake.FakeConfig(word="fail"), "fake_script"), "three")
    assert "ValueError: the fake script failed" in str(e.value) and "three.log" in str(e.value)
    from data.tokenizer import TokenizerConfig
    with pytest.raises(ValueError):
        runner.run((TokenizerConfig(), "data.tokenizer"), "four")  # not in the table: a subprocess only


def test_every_in_process_entry_exists():
    for module, function in jobs.IN_PROCESS.items():
        assert callable(getattr(importlib.import_module(module), function)), module


def test_a_config_as_flags_parses_back_to_itself():
    """flags(cfg) is the command line of only the fields off their defaults (booleans true/false); parse_config
    reads it back as the config that checked(cfg) makes in process, down to the fields it counts as given."""
    import eval as E
    import train
    from world.generate import GenConfig
    from utils import parse_config
    cfg = train.TrainConfig(data="d/train.jsonl", lr=3e-3, resume=True, overwrite=True, steps=6, warmup=2,
                            seed=1, oracle_low=0.25, feature_cache="", no_k=False, tokenizer="a b.json")
    assert jobs.flags(cfg) == ["--data", "d/train.jsonl", "--tokenizer", "a b.json", "--oracle-low", "0.25",
                               "--steps", "6", "--lr", "0.003", "--warmup", "2", "--seed", "1", "--resume", "true",
                               "--overwrite", "true"]  # in field order
    assert jobs.command((cfg, "train"))[:3] == ["-m", "experiments", "train"]
    assert jobs.command((GenConfig(mix="hard"), "world.generate")) == ["-m", "world.generate", "--mix", "hard"]
    for c in (cfg, train.TrainConfig(), train.TrainConfig(alpha=2, compile=True), E.EvalConfig(blind=False),
              GenConfig(image_share=0.3, n_train=10)):
        back = parse_config(type(c), jobs.flags(c))
        here = jobs.checked(c)
        assert back == here and getattr(back, "_given", None) == getattr(here, "_given", None), c
    assert type(jobs.checked(train.TrainConfig(alpha=2)).alpha) is float  # as the flag --alpha 2 would give
    with pytest.raises(ValueError, match="--warmup 6"):
        jobs.checked(train.TrainConfig(steps=6, warmup=6))  # the config's own checks, as on a command line


def test_worker_processes_run_calls_and_time_them(tmp_path):
    """workers=True: chains run in worker processes started once; a ("call", "module:function", args) job
    returns its own time split, a failing one names its log."""
    runner = jobs.Jobs(str(tmp_path / "logs"), parallel=2, workers=True)
    try:
        runner.run_chains([[(("call", "json:loads", ('{"train_s": 1.5}',)), "a")],
                           [(("call", "os:getpid", ()), "b")]])
        by_name = {name: (kind, split) for name, kind, _, split in runner.timings}
        assert by_name == {"a": ("json", {"train_s": 1.5}), "b": ("os", None)}
        with pytest.raises(SystemExit, match="step failed: json:loads"):
            runner.run_chains([[(("call", "json:loads", ("not json",)), "c")]])
        assert "JSONDecodeError" in (tmp_path / "logs" / "c.log").read_text()
        one = jobs.Jobs(str(tmp_path / "logs"), parallel=1, workers=True)  # a failure stops what is queued
        slow = [(("call", "time:sleep", (2,)), "d"), (("call", "json:loads", ("not json",)), "e")]
        with pytest.raises(SystemExit):
            one.run_chains([slow, [(("call", "os:mkdir", (str(tmp_path / "queued"),)), "f")]])
        one.close()
        assert not (tmp_path / "queued").exists()
    finally:
        runner.close()
