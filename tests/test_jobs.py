"""experiments/jobs.py: the job runner of experiments/main.py and experiments/paper.py (subprocesses with their
share of the cores and a log each, chains in order, failures naming their log, the in-process mode)."""
import importlib
import os
import sys

import pytest

from experiments import jobs


def test_a_failing_job_names_its_log_and_shows_its_tail(tmp_path):
    runner = jobs.Jobs(str(tmp_path / "logs"), parallel=2)
    with pytest.raises(SystemExit) as e:
        runner.run(["-c", "print('the last words'); raise SystemExit(3)"], "bad")
    log = str(tmp_path / "logs" / "bad.log")
    assert f"--- last lines of {log} ---" in str(e.value) and "the last words" in str(e.value)
    assert str(e.value).startswith(f"step failed: {sys.executable} -c ")


def test_chains_run_in_order_with_their_threads_and_links(tmp_path):
    record = open(tmp_path / "commands.txt", "w")
    runner = jobs.Jobs(str(tmp_path / "logs"), parallel=2, record=record)
    out = tmp_path / "order.txt"

    def append(text):  # a job that appends its text and its OMP thread count to out
        code = f"import os; open({str(out)!r}, 'a').write({text!r} + os.environ['OMP_NUM_THREADS'] + ',')"
        return ["-c", code]
    (tmp_path / "ckpt.pt").write_text("weights")
    link = (["link", str(tmp_path / "ckpt.pt"), str(tmp_path / "l.pt")], None)
    chain = [(append("a"), "a"), (append("b"), "b"), link, (append("c"), "c")]
    runner.run_chains([chain], threads=3)
    assert out.read_text() == "a3,b3,c3,"
    assert os.path.samefile(tmp_path / "ckpt.pt", tmp_path / "l.pt")
    assert sorted(os.listdir(tmp_path / "logs")) == ["a.log", "b.log", "c.log"]
    assert len((tmp_path / "commands.txt").read_text().splitlines()) == 3
    # without threads= each job gets cores // parallel
    out.unlink()
    runner.run_chains([[(append("d"), "d")]])
    assert out.read_text() == f"d{runner.threads_per_process(['-c'])},"
    record.close()


FAKE = '''
from dataclasses import dataclass, field


@dataclass
class FakeConfig:
    word: str = field(default="", metadata={"help": "what to say"})


def say(cfg):
    print("said", cfg.word)
    if cfg.word == "fail":
        raise ValueError("the fake script failed")
'''


def test_in_process_jobs_use_the_table(tmp_path, monkeypatch):
    """In process, a job calls the function IN_PROCESS names for its script (or, for -m, its module), with the
    script's flags parsed into its config; its output goes to its log, a failure names the log."""
    (tmp_path / "fake_script.py").write_text(FAKE)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(jobs.IN_PROCESS, "fake.py", ("fake_script", "FakeConfig", "say"))
    monkeypatch.setitem(jobs.IN_PROCESS, "pkg.fake", ("fake_script", "FakeConfig", "say"))
    runner = jobs.Jobs(str(tmp_path / "logs"), parallel=1, in_process=True)
    runner.run_chains([(["fake.py", "--word", "hello"], "one"), (["-m", "pkg.fake", "--word", "again"], "two")])
    assert (tmp_path / "logs" / "one.log").read_text() == "said hello\n"
    assert (tmp_path / "logs" / "two.log").read_text() == "said again\n"
    with pytest.raises(SystemExit, match="step failed: fake.py --word fail") as e:
        runner.run(["fake.py", "--word", "fail"], "three")
    assert "ValueError: the fake script failed" in str(e.value) and "three.log" in str(e.value)
    with pytest.raises(ValueError):
        runner.run(["-m", "data.tokenizer"], "four")  # not in the table


def test_every_in_process_entry_exists():
    for script, (module, config, function) in jobs.IN_PROCESS.items():
        mod = importlib.import_module(module)
        assert isinstance(getattr(mod, config), type) and callable(getattr(mod, function)), script


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
