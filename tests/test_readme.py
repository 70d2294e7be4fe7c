"""The README's results tables are the ones benchmarks/report.py renders from benchmarks/results/*.json: every
table row there appears in the README, so a table cannot silently go stale or go missing in an edit."""
from pathlib import Path

import pytest

from benchmarks import report

README = Path(__file__).resolve().parents[1] / "README.md"


@pytest.mark.parametrize("which", sorted(report.TABLES))
def test_every_rendered_table_row_is_in_the_readme(which):
    text = report.TABLES[which](report.load(which))
    readme = README.read_text(encoding="utf-8").splitlines()
    rows = [line for line in text.splitlines() if line.startswith("|")]
    assert rows, f"report.py rendered no table for {which}"
    missing = [row for row in rows if row not in readme]
    assert not missing, f"{len(missing)} of {len(rows)} rows of the {which} tables are not in the README, e.g. " \
                        f"{missing[0]!r}; paste `python benchmarks/report.py {which}` into it"


def test_a_benchmark_run_as_a_script_does_not_shadow_installed_packages(tmp_path):
    """`python benchmarks/x.py` puts benchmarks/ first on sys.path, where kernels.py would shadow the `kernels`
    package transformers imports when it is installed; importing the benchmarks package takes the folder off."""
    import subprocess
    import sys
    root = README.parent
    probe = tmp_path / "probe.py"
    probe.write_text(f"import sys\nsys.path.insert(0, {str(root / 'benchmarks')!r})\n"
                     f"sys.path.insert(0, {str(root)!r})\nimport benchmarks, importlib.util\n"
                     "spec = importlib.util.find_spec('kernels')\nprint(spec.origin if spec else None)\n")
    out = subprocess.run([sys.executable, str(probe)], capture_output=True, text=True, check=True).stdout.strip()
    assert not out.startswith(str(root / "benchmarks")), out
