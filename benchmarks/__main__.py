"""python -m benchmarks SCRIPT [flags]: a core script (train, eval, score, reference_lm) with benchmarks/'s
plug-ins registered."""
from utils import run_script
import benchmarks  # noqa: F401 (registers the plug-ins)

if __name__ == "__main__":
    run_script("benchmarks")
