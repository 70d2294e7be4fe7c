"""The README's results tables are the ones benchmarks/report.py renders from benchmarks/results/*.json: every
table row there appears in the README, so a table cannot silently go stale or go missing in an edit."""
import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
REPORTS = ["ar", "kernels", "selfspec", "auto", "tp"]


def _report():
    spec = importlib.util.spec_from_file_location("report", ROOT / "benchmarks" / "report.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("which", REPORTS)
def test_every_rendered_table_row_is_in_the_readme(which):
    report = _report()
    render = {"ar": report.ar_tables, "kernels": report.kernel_tables, "selfspec": report.selfspec_tables,
              "auto": report.auto_tables, "tp": report.tp_tables}[which]
    text = render(json.loads((report.RESULTS / f"{which}.json").read_text()))
    readme = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    rows = [line for line in text.splitlines() if line.startswith("|")]
    assert rows, f"report.py rendered no table for {which}"
    missing = [row for row in rows if row not in readme]
    assert not missing, f"{len(missing)} of {len(rows)} rows of the {which} tables are not in the README, e.g. " \
                        f"{missing[0]!r}; paste `python benchmarks/report.py {which}` into it"
