"""experiments/see.py: the table of grounding gaps (mean and worst seed per arm and image tokens per patch)."""
import subprocess
import sys
from pathlib import Path

from pytest import approx

from experiments import see

ROOT = Path(__file__).resolve().parents[1]


def test_summary_is_the_mean_and_the_worst_seed():
    rows = [{"tokens": 1, "arm": "ntp", "seed": s, "gap_image": g, "gap_shape": 2 * g} for s, g in ((0, 0.1), (1, 0.3))]
    rows.append({"tokens": 3, "arm": "ntp", "seed": 0, "gap_image": 0.5})
    s = see.summary(rows)
    assert s[1, "ntp"]["gap_image"][0] == approx(0.2) and s[1, "ntp"]["gap_image"][1] == 0.1
    assert "gap_shape" not in s[3, "ntp"]
    table = see.table(rows).splitlines()
    assert len(table) == 4 and table[2].startswith("| 1 | ntp | 2 | 0.200 (min 0.100)")




def test_a_folder_without_the_pieces_is_one_line(tmp_path):
    done = subprocess.run([sys.executable, "-m", "experiments.see", "--from", str(tmp_path)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "--prepare" in done.stderr and len(done.stderr.strip().splitlines()) == 1
