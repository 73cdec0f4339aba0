"""The README's two fresh-machine commands are exactly what CI runs, and the demo works."""

import pathlib
import re
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def readme_commands():
    blocks = re.findall(r"```bash\n(.*?)\n```", (ROOT / "README.md").read_text(), flags=re.S)
    return blocks[0].strip(), blocks[1].strip()


def test_ci_runs_the_readme_commands():
    install_and_run, test = readme_commands()
    ci = (ROOT / ".ci" / "run").read_text()
    install = install_and_run.rsplit(" && ", 1)[0]
    assert install in ci, "the README install command must appear verbatim in .ci/run"
    assert "\n" + test + "\n" in ci, "the README test command must appear verbatim in .ci/run"
    assert "exit 5" in ci or '"$rc" -eq 5' in ci


def test_demo_runs():
    out = subprocess.run([sys.executable, str(ROOT / "examples" / "demo.py")], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "consistency loss" in out.stdout
