"""What every tutorial shares: the fast-mode flag, a scratch directory for training runs, figures and
training logs.

``MINIBVIT_FAST=1`` shrinks sizes and steps so that CI runs every tutorial in well under a minute.
Import this module before numpy: it pins the thread pools and calls minibvit.process.configure_process
first (see below). `quantizer_inputs` is minibvit.diagnostics.record_quantizer_inputs.
"""
import atexit
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

# The tutorial models are tiny (64-wide matrices): handing such a matmul to a second thread costs
# more than it saves, and on a busy 2-core machine OpenBLAS's threads made a training step ten
# times slower (0.3 s instead of 0.03 s). One thread per pool; set the variables yourself to override.
for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "NUMBA_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

TUTORIALS = Path(__file__).resolve().parent
REPO = TUTORIALS.parent
FIGURES = TUTORIALS / "figures"

try:  # an installed minibvit (pip install -e .), else the checkout this file lives in
    import minibvit  # noqa: F401
except ImportError:
    sys.path.insert(0, str(REPO))
    import minibvit  # noqa: F401
from minibvit.process import configure_process  # noqa: E402

PROCESS = configure_process()  # minibvit's thread-pool and malloc settings, before NumPy loads
from minibvit.diagnostics import record_quantizer_inputs as quantizer_inputs  # noqa: E402,F401  (re-exported)

FAST = os.environ.get("MINIBVIT_FAST", "0") not in ("", "0")
IN_NOTEBOOK = "ipykernel" in sys.modules

import matplotlib  # noqa: E402

if not IN_NOTEBOOK:
    matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402,F401  (re-exported for the tutorials)

_START = time.perf_counter()
RUNS = Path(tempfile.mkdtemp(prefix="minibvit-tutorial-"))
atexit.register(shutil.rmtree, RUNS, ignore_errors=True)
atexit.register(lambda: print(f"ran for {time.perf_counter() - _START:.1f} s"
                              f" ({'fast' if FAST else 'full'} mode)"))


def pick(full, fast):
    """The full-mode value, or the fast-mode one when MINIBVIT_FAST=1."""
    return fast if FAST else full


def run_dir(name):
    """A directory for a training run under this session's scratch directory (removed at exit)."""
    return str(RUNS / name)


def save_figure(fig, name):
    """Save fig as tutorials/figures/<name>.png, show it when running in a notebook, close it."""
    FIGURES.mkdir(exist_ok=True)
    path = FIGURES / f"{name}.png"
    fig.savefig(path, dpi=110, bbox_inches="tight")
    if IN_NOTEBOOK:
        from IPython.display import display

        display(fig)
    plt.close(fig)
    print(f"saved {path.relative_to(REPO)}")
    return path


def read_log(run, stage):
    """The records of <run>/<stage>/log.jsonl split into (per-step records, per-epoch records)."""
    with open(Path(run) / stage / "log.jsonl") as f:
        records = [json.loads(line) for line in f]
    return [r for r in records if "loss" in r], [r for r in records if "test_acc" in r]
