"""python -m benchmarks SCRIPT [flags]: a core script (train, eval, score, reference_lm) with benchmarks/'s
plug-ins registered."""
import sys

from utils import run_script
from benchmarks import join_repeated  # importing the package registers its plug-ins

if __name__ == "__main__":
    run_script("benchmarks", join_repeated(sys.argv[1:]))
