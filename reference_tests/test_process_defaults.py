"""Importing minibvit changes nothing in the process; minibvit.process.configure_process() sets the
thread-pool environment defaults and, on glibc, malloc settings that keep freed activation memory
mapped, and reports what it set and whether it came too late. Each case runs in a fresh interpreter,
since both take effect once per process."""
import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.impl_specific  # tests minibvit itself (conftest.py: MINIBVIT_ONLY_MODULES)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
THREAD_VARS = ("OMP_WAIT_POLICY", "OPENBLAS_THREAD_TIMEOUT", "GOMP_SPINCOUNT")

# Allocates, fills and frees a 24 MB array (one training activation's size) six times and reports the
# minor page faults of the last five rounds: with the block served by a fresh mmap each round faults
# its pages in again (2620 faults here: 4 KiB pages, fewer with transparent huge pages, but at least one
# a round); with freed memory kept mapped the rounds after the first fault in none.
FAULTS = """
import resource
def faults():
    counts = []
    for _ in range(6):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        a = np.empty(6 << 20, dtype=np.float32)
        a.fill(1.0)
        del a
        counts.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    return sum(counts[1:])
"""

CONFIGURED = """
import json
from minibvit.process import configure_process
report = configure_process()
import numpy as np
""" + FAULTS + """
print(json.dumps({"env": report.env, "malloc": report.malloc, "skipped": report.malloc_skipped,
                  "too_late": list(report.too_late), "faults": faults()}))
"""

glibc_only = pytest.mark.skipif(not sys.platform.startswith("linux")
                                or not os.confstr("CS_GNU_LIBC_VERSION").startswith("glibc"),
                                reason="the malloc settings are glibc's")


def run(code, **env_changes):
    env = {k: v for k, v in os.environ.items() if not (k.startswith("MALLOC_") or k in THREAD_VARS)}
    env.update(env_changes, PYTHONPATH=ROOT)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("order", ["minibvit first", "numpy first", "every module"])
def test_import_changes_nothing(order):
    """No environment variable and no malloc setting changes on import, in any import order: the
    page faults of a freed and reallocated array stay glibc's own (one mmap per round)."""
    imports = {"minibvit first": "import minibvit\nimport numpy as np\n",
               "numpy first": "import numpy as np\nimport minibvit\n",
               "every module": "import numpy as np\nimport minibvit\nfrom minibvit import ViT, cost, methods, train, "
                               "binaryvit, gsb, tervit, diagnostics, quant, process\n"}[order]
    code = ("import json, os\nbefore = dict(os.environ)\n" + imports + FAULTS
            + "print(json.dumps({'changed': sorted(k for k in set(before) | set(os.environ) "
              "if before.get(k) != os.environ.get(k)), 'faults': faults()}))")
    report = run(code)
    assert report["changed"] == [], f"importing minibvit changed {report['changed']}"
    if sys.platform.startswith("linux") and os.confstr("CS_GNU_LIBC_VERSION").startswith("glibc"):
        assert report["faults"] >= 5, f"only {report['faults']} page faults in 5 rounds: malloc was changed"


def test_cost_does_not_load_numba():
    code = "import json, sys\nimport minibvit.cost\nprint(json.dumps({'numba': 'numba' in sys.modules}))"
    assert run(code) == {"numba": False}


@glibc_only
def test_freed_arrays_are_reused_without_page_faults():
    report = run(CONFIGURED)
    assert report["malloc"] == {"M_MMAP_MAX": 0, "M_TRIM_THRESHOLD": 1 << 30}
    assert report["faults"] < 5, f"{report['faults']} page faults in 5 rounds of a freed and reallocated 24 MB array"


@glibc_only
def test_user_malloc_settings_are_left_alone():
    report = run(CONFIGURED, MALLOC_TRIM_THRESHOLD_="131072")
    assert report["malloc"] == {} and "MALLOC_" in report["skipped"]
    # glibc's own behaviour: each round maps and faults in the array again
    assert report["faults"] >= 5, f"only {report['faults']} page faults in 5 rounds: freed memory was kept"


def test_thread_defaults_only_where_unset():
    assert run(CONFIGURED)["env"] == {"OMP_WAIT_POLICY": "PASSIVE", "GOMP_SPINCOUNT": "5000",
                                      "OPENBLAS_THREAD_TIMEOUT": "4"}
    assert run(CONFIGURED, OMP_WAIT_POLICY="ACTIVE")["env"] == {"OPENBLAS_THREAD_TIMEOUT": "4"}
    assert run(CONFIGURED, GOMP_SPINCOUNT="0")["env"] == {"OMP_WAIT_POLICY": "PASSIVE", "OPENBLAS_THREAD_TIMEOUT": "4"}


def test_inference_workload_spins_instead_of_waiting_passively():
    """The packed engine's processes get libgomp's default spin (GOMP_SPINCOUNT) and no PASSIVE wait;
    a user's OMP_WAIT_POLICY or GOMP_SPINCOUNT is kept, and an unknown workload is refused."""
    inference = CONFIGURED.replace("configure_process()", "configure_process(workload='inference')")
    assert run(inference)["env"] == {"GOMP_SPINCOUNT": "300000", "OPENBLAS_THREAD_TIMEOUT": "4"}
    assert run(inference, OMP_WAIT_POLICY="PASSIVE")["env"] == {"OPENBLAS_THREAD_TIMEOUT": "4"}
    assert run(inference, GOMP_SPINCOUNT="1000")["env"] == {"OPENBLAS_THREAD_TIMEOUT": "4"}
    from minibvit.process import configure_process
    with pytest.raises(ValueError, match="workload must be one of train, inference"):
        configure_process(workload="serving")


def test_too_late_is_reported():
    early = run(CONFIGURED)
    assert early["too_late"] == []
    late = run("import json\nimport numpy\nfrom minibvit.process import configure_process\n"
               "r = configure_process()\nprint(json.dumps({'too_late': list(r.too_late), 'text': str(r)}))")
    assert late["too_late"] == ["numpy"] and "too late" in late["text"]


def test_command_line_mains_configure_first():
    """python -m minibvit.train sets the thread defaults before NumPy loads (seen by the process), and
    python -m minibvit.infer those of the inference workload."""
    code = ("import json, os, runpy, sys\nsys.argv = ['minibvit.train', '--help']\n"
            "try:\n    runpy.run_module('minibvit.train', run_name='__main__')\nexcept SystemExit:\n    pass\n"
            "print(json.dumps({k: os.environ.get(k) for k in " + repr(THREAD_VARS) + "}))")
    assert run(code) == {"OMP_WAIT_POLICY": "PASSIVE", "OPENBLAS_THREAD_TIMEOUT": "4", "GOMP_SPINCOUNT": "5000"}
    packed = code.replace("minibvit.train", "minibvit.infer")
    assert run(packed) == {"OMP_WAIT_POLICY": None, "OPENBLAS_THREAD_TIMEOUT": "4", "GOMP_SPINCOUNT": "300000"}
