"""python -m experiments SCRIPT [flags]: a core script (train, eval, score, reference_lm) with experiments/'s
plug-ins registered."""
import sys

from utils import run_script
from benchmarks import join_repeated
import experiments  # noqa: F401 (registers the plug-ins)

if __name__ == "__main__":
    run_script("experiments", join_repeated(sys.argv[1:]))
