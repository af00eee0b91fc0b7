"""python -m scale SCRIPT [flags]: a core script (train, eval, score, reference_lm) with scale/'s
plug-ins registered."""
from utils import run_script
import scale  # noqa: F401 (registers the plug-ins)

if __name__ == "__main__":
    run_script("scale")
