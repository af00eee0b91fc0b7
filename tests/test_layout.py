"""The layout's limits (README's Files): the core fits in 2,000 lines, no file over 400, a README that fits a
screen or so, at most 8 .py files at the root (the method; plumbing lives in folders named for its role), short
functions in train.py, no import cycle, and no script imports another script's helpers."""
import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parent.parent
CORE = ["model.py", "loss.py", "reference_lm.py", "score.py", "train.py"]
SKIP = {"tests", "docs", "results", "out", "runs", "__pycache__"}
# Scripts others may import: what the benchmark times (train.py's step, score.py's scoring), and small tools with a
# CLI of their own whose functions are the point (the tokenizer, the Hugging Face loader, the data generator).
IMPORTABLE_SCRIPTS = {"train", "score", "data.tokenizer", "lib.hf", "data.generate"}


def sources():
    out = {}
    for path in sorted(ROOT.rglob("*.py")):
        rel = path.relative_to(ROOT)
        if not any(part in SKIP or part.startswith(".") for part in rel.parts[:-1]):
            out[rel] = path.read_text(encoding="utf-8")
    return out


def module_name(rel):
    return ".".join(rel.with_suffix("").parts).removesuffix(".__init__")


def imports(rel, text, known):
    """Project modules `text` imports anywhere (top level or inside functions)."""
    package = module_name(rel).rpartition(".")[0] if rel.name != "__init__.py" else module_name(rel)
    found = set()
    for node in ast.walk(ast.parse(text)):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(p for p in (package, base) if p)
            names = [base] + [f"{base}.{a.name}" for a in node.names]
        found |= {n for n in names if n in known}
    return found - {module_name(rel)}


def is_script(text):
    return "if __name__ == \"__main__\":" in text


def test_core_and_file_sizes():
    files = sources()
    lines = {rel: text.count("\n") for rel, text in files.items()}
    core = sum(lines[pathlib.Path(f)] for f in CORE)
    assert core <= 2000, f"core (model, loss, reference_lm, score, train) has {core} lines"
    big = {str(rel): n for rel, n in lines.items() if n > 400}
    assert not big, f"files over 400 lines: {big}"
    readme = (ROOT / "README.md").read_text(encoding="utf-8").count("\n")
    assert readme <= 250, f"README.md has {readme} lines"
    assert (ROOT / "baselines" / "__init__.py").exists() and (ROOT / "experiments").is_dir()


def test_no_import_cycles_and_no_script_imports_a_script():
    files = sources()
    known = {module_name(rel): rel for rel in files}
    graph = {m: imports(rel, files[rel], known) for m, rel in known.items()}
    cycles, state = [], {}

    def visit(m, stack):
        state[m] = "open"
        for n in sorted(graph[m]):
            if state.get(n) == "open":
                cycles.append(" -> ".join(stack[stack.index(n):] + [n]))
            elif n not in state:
                visit(n, stack + [n])
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert not cycles, "import cycles: " + "; ".join(cycles)
    scripts = {m for m, rel in known.items() if is_script(files[rel])}
    bad = sorted(f"{m} imports {n}" for m in scripts for n in graph[m] & scripts if n not in IMPORTABLE_SCRIPTS)
    assert not bad, "scripts importing other scripts (move the shared piece into a module): " + "; ".join(bad)


def test_the_checker_sees_a_cycle(tmp_path):
    """The cycle test can fail: two modules that import each other are found."""
    a, b = pathlib.Path("a.py"), pathlib.Path("b.py")
    known = {"a": a, "b": b}
    assert imports(a, "import b\n", known) == {"b"} and imports(b, "from a import x\n", known) == {"a"}


def longest_functions(text):
    """{function name: its length in lines} for the top-level functions of a module."""
    return {n.name: n.end_lineno - n.lineno + 1 for n in ast.parse(text).body if isinstance(n, ast.FunctionDef)}


def test_a_calm_root_and_short_train_functions():
    root = sorted(p.name for p in ROOT.glob("*.py"))
    assert len(root) <= 8, f"{len(root)} .py files at the root (limit 8): {root}"
    assert set(CORE) | {"eval.py"} <= set(root)
    lengths = longest_functions((ROOT / "train.py").read_text(encoding="utf-8"))
    assert lengths["train_step"] <= 50, f"train.train_step has {lengths['train_step']} lines (limit 50)"
    assert lengths["main"] <= 60, f"train.main has {lengths['main']} lines (limit 60)"
    assert longest_functions("def f():\n    a = 1\n    return a\n") == {"f": 3}


def test_readme_shows_the_method_first_and_a_short_files_table():
    """README: the method-in-code pointer on the first screen (40 lines), and a files table of folders, not of
    every module (at most 10 rows)."""
    lines = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    assert "## The method in code" in lines[:40]
    table = []
    for line in lines[lines.index("## Files") + 2:]:  # the heading, a blank line, then the table
        if not line.startswith("|"):
            break
        table.append(line)
    rows = table[2:]  # after the header and the |---| line
    assert 5 <= len(rows) <= 10, f"README's files table has {len(rows)} rows (limit 10)"
    assert {"`data/`", "`lib/`", "`experiments/`"} <= {r.split("|")[1].strip() for r in rows}
