"""The README's two set-up commands stay true: the second is exactly what CI runs."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def readme_commands():
    text = (ROOT / "README.md").read_text()
    return re.findall(r"```bash\n(.+?)\n```", text)[:2]


def test_readme_starts_with_the_two_commands():
    text = (ROOT / "README.md").read_text()
    install_run, install_test = readme_commands()
    assert text.index(install_run) < text.index(install_test) < text.index("## ")
    assert install_run.endswith("pyro-vae train")
    assert "torch==" in install_run and "torch==" in install_test


def test_ci_runs_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert readme_commands()[1] in ci
