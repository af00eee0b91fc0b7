"""The layout's rules (README's Files): the core (the .py files at the root and data/) imports nothing outside the
core, no two folders import each other, no module import cycle, and the core stays within its line budget. The
checkers are tested on made-up graphs, so each rule can fail."""
import ast
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
SKIP = {"tests", "docs", "results", "out", "runs", "__pycache__"}
# The core's budget is 3,500 lines (the design card's): the core may not grow past it (the synthetic world,
# world/, is lab: the core reads any captions, tagged or not).
CORE_BUDGET = 3500  # the design card's ceiling on the core (root .py files and data/)


def sources():
    """{relative path: text} of the project's Python files (tests, docs, outputs and hidden folders left out)."""
    out = {}
    for path in sorted(ROOT.rglob("*.py")):
        rel = path.relative_to(ROOT)
        if not any(part in SKIP or part.startswith(".") for part in rel.parts[:-1]):
            out[rel] = path.read_text(encoding="utf-8")
    return out


def module_name(rel):
    return ".".join(rel.with_suffix("").parts).removesuffix(".__init__")


def folder(module):
    """The core (root modules and data/) or the top-level lab folder a module (or package) lives in."""
    top = module.split(".")[0]
    return "core" if top == "data" or ("." not in module and not (ROOT / top).is_dir()) else top


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


def graph_of(files):
    known = {module_name(rel): rel for rel in files}
    return {m: imports(rel, files[rel], known) for m, rel in known.items()}


def core_imports_of_the_lab(graph):
    return sorted(f"{m} -> {n}" for m, deps in graph.items() for n in deps
                  if folder(m) == "core" and folder(n) != "core")


def folder_ties(graph):
    """Pairs of folders (the core counts as one) that import each other."""
    edges = {(folder(m), folder(n)) for m, deps in graph.items() for n in deps if folder(m) != folder(n)}
    return sorted({tuple(sorted(e)) for e in edges if (e[1], e[0]) in edges})


def cycles(graph):
    found, state = [], {}

    def visit(m, stack):
        state[m] = "open"
        for n in sorted(graph[m]):
            if state.get(n) == "open":
                found.append(" -> ".join(stack[stack.index(n):] + [n]))
            elif n not in state:
                visit(n, stack + [n])
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    return found


def core_lines(files):
    return sum(text.count("\n") for rel, text in files.items() if folder(module_name(rel)) == "core")


def test_the_core_imports_nothing_outside_the_core():
    bad = core_imports_of_the_lab(graph_of(sources()))
    assert not bad, "core modules importing the lab (register a plug-in instead: utils.register): " + "; ".join(bad)


def test_no_two_folders_import_each_other_and_no_cycle():
    graph = graph_of(sources())
    assert not folder_ties(graph), f"folders importing each other: {folder_ties(graph)}"
    assert not cycles(graph), "import cycles: " + "; ".join(cycles(graph))


def test_the_core_within_its_line_budget():
    n = core_lines(sources())
    assert n <= CORE_BUDGET, f"the core (root .py files and data/) has {n} lines, budget {CORE_BUDGET}: move a lab " \
                             f"feature out through a plug-in, or make it simpler"


def test_the_checkers_can_fail():
    """Each rule finds what it is there to find, on a made-up project."""
    graph = {"train": {"data.records", "scale.stream"}, "data.records": set(), "scale.stream": {"train"},
             "bench.x": {"experiments.y"}, "experiments.y": {"bench.x"}}
    assert core_imports_of_the_lab(graph) == ["train -> scale.stream"]
    assert folder_ties(graph) == [("bench", "experiments"), ("core", "scale")]
    assert cycles(graph) and not cycles({"a": {"b"}, "b": set()})
    known = {"a": pathlib.Path("a.py"), "b": pathlib.Path("b.py")}
    assert imports(pathlib.Path("a.py"), "def f():\n    from b import x\n", known) == {"b"}
    assert core_lines({pathlib.Path("train.py"): "a\nb\n", pathlib.Path("scale/x.py"): "c\n"}) == 2


def test_a_lab_flag_without_its_plug_in_is_one_line():
    """The core script alone refuses a lab feature with one line naming the flag and how to get it; through the
    lab folder it is there (--help of `python -m scale train` is the same script)."""
    done = subprocess.run([sys.executable, "train.py", "--stream", "--data", "nowhere.jsonl"], cwd=ROOT,
                          capture_output=True, text=True)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "--stream" in lines[0] and "python -m" in lines[0], done.stderr
    done = subprocess.run([sys.executable, "-m", "scale", "train", "--help"], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0 and "--stream" in done.stdout


def test_readme_shows_the_method_first_and_the_core_and_lab_in_its_files_table():
    """README: the method-in-code pointer on the first screen (40 lines), a files table with the core's files and
    the lab's folders, and the command that prints the layout's numbers."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    lines = text.splitlines()
    assert len(lines) <= 250
    assert "## The method in code" in lines[:40]
    table = []
    for line in lines[lines.index("## Files") + 2:]:  # the heading, a blank line, then the table
        if not line.startswith("|"):
            break
        table.append(line)
    firsts = {r.split("|")[1].strip() for r in table[2:]}
    assert {"`data/`", "`baselines/`", "`benchmarks/`", "`scale/`", "`experiments/`", "`bench/`"} <= firsts, firsts
    assert "python tests/test_layout.py" in text


def main():
    """Lines of Python per folder (the core's files one by one): what README's Files table reports."""
    counts = {}
    for rel, text in sources().items():
        m = module_name(rel)
        key = str(rel) if folder(m) == "core" and "/" not in str(rel) else folder(m) if folder(m) != "core" else "data/"
        counts[key] = counts.get(key, 0) + text.count("\n")
    for key, n in sorted(counts.items(), key=lambda kv: ("/" in kv[0] or not kv[0].endswith(".py"), kv[0])):
        print(f"{key:20s} {n:6d}")
    print(f"{'core':20s} {core_lines(sources()):6d}   (budget {CORE_BUDGET})")


if __name__ == "__main__":
    main()
