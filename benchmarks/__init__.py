"""GPU benchmarks, each run as `python benchmarks/<name>.py` (see benchmarks/NOTES.md)."""
import sys
from pathlib import Path

# Run as a script, a benchmark has this folder first on sys.path, where kernels.py shadows the `kernels` package
# that transformers imports when it is installed (loading a tokenizer then fails). Siblings are imported as
# benchmarks.<name>, so the folder itself need not be on the path.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
