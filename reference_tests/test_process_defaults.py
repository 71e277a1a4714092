"""What importing minibvit sets for the whole process: thread-pool environment defaults and, on glibc,
malloc settings that keep freed activation memory mapped (minibvit/__init__.py). Each case runs in a
fresh interpreter, since both take effect once per process."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Allocates, fills and frees a 24 MB array (one training activation's size) six times and reports the
# minor page faults of the last five rounds: with the block served by a fresh mmap each round faults
# its pages in again (2620 faults here: 4 KiB pages, fewer with transparent huge pages, but at least one
# a round); with freed memory kept mapped the rounds after the first fault in none.
PROBE = """
import json, resource, sys
import minibvit
import numpy as np
faults = []
for _ in range(6):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    a = np.empty(6 << 20, dtype=np.float32)
    a.fill(1.0)
    del a
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({"env": minibvit.ENV_DEFAULTS_SET, "malloc": minibvit.MALLOC_DEFAULTS_SET,
                  "faults": sum(faults[1:])}))
"""

glibc_only = pytest.mark.skipif(not sys.platform.startswith("linux")
                                or not os.confstr("CS_GNU_LIBC_VERSION").startswith("glibc"),
                                reason="the malloc settings are glibc's")


def run_probe(**env_changes):
    env = {k: v for k, v in os.environ.items()
           if not (k.startswith("MALLOC_") or k in ("OMP_WAIT_POLICY", "OPENBLAS_THREAD_TIMEOUT"))}
    env.update(env_changes, PYTHONPATH=ROOT)
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


@glibc_only
def test_freed_arrays_are_reused_without_page_faults():
    report = run_probe()
    assert report["malloc"] == {"M_MMAP_MAX": 0, "M_TRIM_THRESHOLD": 1 << 30}
    assert report["faults"] < 5, f"{report['faults']} page faults in 5 rounds of a freed and reallocated 24 MB array"


@glibc_only
def test_user_malloc_settings_are_left_alone():
    report = run_probe(MALLOC_TRIM_THRESHOLD_="131072")
    assert report["malloc"] == {}
    # glibc's own behaviour: each round maps and faults in the array again
    assert report["faults"] >= 5, f"only {report['faults']} page faults in 5 rounds: freed memory was kept"


def test_thread_defaults_only_where_unset():
    assert run_probe()["env"] == {"OMP_WAIT_POLICY": "PASSIVE", "OPENBLAS_THREAD_TIMEOUT": "4"}
    assert run_probe(OMP_WAIT_POLICY="ACTIVE")["env"] == {"OPENBLAS_THREAD_TIMEOUT": "4"}
