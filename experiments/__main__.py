"""python -m experiments SCRIPT [flags]: a core script (train, eval, score, reference_lm) with experiments/'s
plug-ins registered."""
from utils import run_script
import experiments  # noqa: F401 (registers the plug-ins)

if __name__ == "__main__":
    run_script("experiments")
