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


@pytest.mark.parametrize("doc", ["README.md", "docs/experiments.md"])
def test_every_relative_link_points_to_a_file_that_exists(doc):
    """Results files are quoted by link; a renamed or deleted one must not leave a dead link behind."""
    import re
    path = README.parent / doc
    links = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", path.read_text(encoding="utf-8"))
    local = [link for link in links if not link.startswith(("http://", "https://"))]
    assert local, f"no relative links found in {doc}"
    dead = [link for link in local if not (path.parent / link).exists()]
    assert not dead, f"{len(dead)} dead links in {doc}, e.g. {dead[:3]}"


def test_every_section_anchor_the_readme_links_in_the_experiments_record_exists():
    """The README points into docs/experiments.md by section anchor (GitHub's slug of the heading)."""
    import re
    readme = README.read_text(encoding="utf-8")
    record = (README.parent / "docs" / "experiments.md").read_text(encoding="utf-8")
    slugs = {re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
             for heading in re.findall(r"^#+ (.+)$", record, flags=re.M)}
    wanted = re.findall(r"\]\(docs/experiments\.md#([^)]+)\)", readme)
    assert wanted, "the README links no section of docs/experiments.md"
    missing = [anchor for anchor in wanted if anchor not in slugs]
    assert not missing, f"anchors missing from docs/experiments.md: {missing}"
