"""Every tutorial runs top to bottom in fast mode, and its checks (assertions) hold.

Each ``tutorials/[0-9][0-9]_*.py`` runs as a subprocess with ``MINIBVIT_FAST=1`` and the Agg
matplotlib backend; a failing check in a tutorial fails its test here. New tutorials are picked up by
the file pattern.
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.impl_specific  # tests minibvit itself (conftest.py: MINIBVIT_ONLY_MODULES)

pytest.importorskip("torch", reason="the tutorials check minibvit against PyTorch")
pytest.importorskip("matplotlib", reason="the tutorials draw figures (pip install -e '.[tutorials]')")

REPO = Path(__file__).resolve().parent.parent
TUTORIALS = sorted((REPO / "tutorials").glob("[0-9][0-9]_*.py"))
TIMEOUT_S = 600  # fast mode takes well under a minute per tutorial; this only guards against a hang


def test_tutorials_exist():
    assert len(TUTORIALS) >= 6, f"expected the tutorials 01..06 in {REPO / 'tutorials'}, found {TUTORIALS}"


@pytest.mark.parametrize("path", TUTORIALS, ids=lambda p: p.name)
def test_tutorial_runs_in_fast_mode(path):
    env = {**os.environ, "MINIBVIT_FAST": "1", "MPLBACKEND": "Agg",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run([sys.executable, str(path)], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=TIMEOUT_S)
    assert proc.returncode == 0, (
        f"{path.name} failed (exit code {proc.returncode}).\n"
        f"--- last lines of stdout ---\n{proc.stdout[-3000:]}\n--- last lines of stderr ---\n{proc.stderr[-5000:]}")


@pytest.mark.parametrize("path", TUTORIALS, ids=lambda p: p.name)
def test_tutorial_is_a_notebook(path):
    """The percent-format file opens as a notebook with explanation (markdown) and code cells."""
    jupytext = pytest.importorskip("jupytext", reason="pip install -e '.[tutorials]'")
    notebook = jupytext.read(path)
    kinds = [cell.cell_type for cell in notebook.cells]
    assert kinds.count("markdown") >= 3 and kinds.count("code") >= 3, (
        f"{path.name}: {kinds.count('markdown')} markdown and {kinds.count('code')} code cells; a tutorial "
        f"alternates '# %% [markdown]' explanation cells and '# %%' code cells")
    assert kinds[0] == "markdown" and notebook.cells[0].source.lstrip().startswith("# "), (
        f"{path.name}: the first cell should be a markdown cell with the tutorial's title")
