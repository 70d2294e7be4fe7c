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
