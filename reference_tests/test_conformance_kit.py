"""The conformance kit checked on itself: each case runs pytest in a subprocess against one of the
example implementations in reference_tests/impls/ and inspects what it reports.

- the import guard fails a test module that imports minibvit while another implementation is
  selected (at collection, and at run time for a dynamic import);
- the tests' own PyTorch references, as an outside implementation, pass; names they lack are
  skipped with the missing name in the reason;
- the deliberately broken implementation fails each of its four bugs, with a message naming the
  case and the inputs, and nothing it lacks is reported green;
- a model with its own parameter names passes the whole-model tests through a PARAM_NAMES map.
"""
import os
import re
import subprocess
import sys
import textwrap

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

pytestmark = pytest.mark.no_impl


def run_pytest(*args, cwd=ROOT, timeout=900):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, HERE, os.environ.get("PYTHONPATH", "")]))
    env.pop("MINIBVIT_IMPL", None)
    env.pop("MINIBVIT_PROFILE", None)
    proc = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)
    return proc.returncode, proc.stdout + proc.stderr


def outcomes(output):
    """{test id (parameters dropped): outcome} from pytest -v's progress lines; a failed parameter wins."""
    found = {}
    for line in output.splitlines():
        m = re.match(r"(\S+::[^\s\[]+)(\[\S*\])? (PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)", line)
        if m and found.get(m.group(1)) != "FAILED":
            found[m.group(1)] = m.group(3)
    return found


def test_guard_fails_a_test_module_that_imports_minibvit(tmp_path):
    (tmp_path / "test_static.py").write_text(textwrap.dedent("""
        from minibvit import quant

        def test_sign():
            assert quant.sign is not None
    """))
    (tmp_path / "test_dynamic.py").write_text(textwrap.dedent("""
        import importlib

        def test_sign():
            assert importlib.import_module("minibvit.quant").sign is not None
    """))
    code, out = run_pytest("-p", "conftest", "--impl", "impls.torch_impl", "test_static.py", "-q", cwd=tmp_path)
    assert code != 0, out
    assert re.search(r"test_static\.py imports minibvit \(line 2: from minibvit import quant\) while the "
                     r"implementation under test is impls\.torch_impl", out), out
    code, out = run_pytest("-p", "conftest", "--impl", "impls.torch_impl", "test_dynamic.py", "-q", cwd=tmp_path)
    assert code != 0, out
    assert re.search(r"test_dynamic\.py::test_sign imports minibvit \(minibvit[^)]*\) while the implementation "
                     r"under test is impls\.torch_impl", out), out
    # the same files are fine when minibvit itself is under test
    code, out = run_pytest("-p", "conftest", str(tmp_path), "-q", cwd=tmp_path)
    assert code == 0 and "2 passed" in out, out


def test_torch_references_as_an_outside_implementation_pass():
    code, out = run_pytest("reference_tests", "--impl", "impls.torch_impl", "-v", "-rA",
                           "--ignore", os.path.join(HERE, "test_conformance_kit.py"))
    assert code == 0, out[-5000:]
    seen = outcomes(out)
    for name in ("test_ops.py::test_layernorm", "test_ops.py::test_gelu", "test_ops.py::test_softmax",
                 "test_model.py::test_whole_model_matches_torch", "test_quant.py::test_binarize_matches_torch",
                 "test_quant.py::test_clipped_ste_passes_gradient_up_to_and_including_one"):
        assert any(k.startswith(f"reference_tests/{name}") and v == "PASSED" for k, v in seen.items()), \
            f"{name} did not pass under the torch implementation:\n{out[-5000:]}"
    assert "does not provide 'ops.linear_forward'" in out, "a missing name must be named in the skip reason"
    assert "impl_specific (float32 summation order, bit for bit)" in out
    assert not re.search(r"^ERROR", out, re.M), out[-5000:]


BUGS = {  # bug -> (failing test, text its report must hold: the case, and the inputs)
    "LayerNorm backward missing a term": ("test_ops.py::test_layernorm",
                                          [r"layernorm dx differs from the reference", r"Failing test case: test_layernorm\(",
                                           r"rows=\d+", r"Draw \d+ \(x\): array", r"Draw \d+ \(g\): array"]),
    "GELU tanh/erf mixed": ("test_ops.py::test_gelu",
                            [r"gelu\[(none|tanh)\] dx differs from the reference", r"Failing test case: test_gelu\(",
                             r"x=array\(", r"approximate='(none|tanh)'"]),
    "sign(0) = 0": ("test_quant.py::test_sign_of_zero_is_plus_one",
                    [r"sign\(±0\): not bit-exact at \[\[0\], \[1\]\]: got \[0\. 0\.\], want \[1\. 1\.\]"]),
    "< for <= in the clipped STE": ("test_quant.py::test_clipped_ste_passes_gradient_up_to_and_including_one",
                                    [r"clipped STE at x = -1\.5, -1, -0\.5, 0\.5, 1, 1\.5: not bit-exact at \[\[1\], \[4\]\]"]),
}


def test_broken_implementation_fails_each_bug_naming_case_and_inputs():
    code, out = run_pytest(os.path.join("reference_tests", "test_ops.py"), os.path.join("reference_tests", "test_quant.py"),
                           "--impl", "impls.broken", "-v", "-rA")
    assert code == 1, out[-5000:]
    seen = outcomes(out)
    for bug, (test, patterns) in BUGS.items():
        assert seen.get(f"reference_tests/{test}") == "FAILED", f"bug {bug!r}: {test} did not fail\n{out[-5000:]}"
        for pattern in patterns:
            assert re.search(pattern, out), f"bug {bug!r}: the report lacks {pattern!r}\n{out[-8000:]}"
    # the sign(0) bug also fails the hypothesis test of the sign binarizer, naming the drawn zero
    assert seen.get("reference_tests/test_quant.py::test_binarize_matches_torch") == "FAILED"
    assert re.search(r"sign forward \((identity|clipped|approxsign)\): not bit-exact", out)
    # what the implementation lacks is skipped with its name, never passed
    assert seen.get("reference_tests/test_ops.py::test_kd_soft") == "SKIPPED", out[-5000:]
    assert "does not provide 'ops.kd_soft_forward'" in out
    # nothing green that did not reach the implementation (conftest fails such a test)
    assert "passed without reaching the implementation" not in out
    # and nothing else failed: the other ops and quantizers are minibvit's, and correct
    failed = {k for k, v in seen.items() if v == "FAILED"}
    expected = {f"reference_tests/{t}" for t, _ in BUGS.values()} | {
        "reference_tests/test_quant.py::test_binarize_matches_torch",
        "reference_tests/test_ops.py::test_finite_differences"}  # LayerNorm dx and GELU dx by finite differences
    assert failed <= expected, f"unexpected failures: {sorted(failed - expected)}"


def test_model_with_its_own_parameter_names_passes_through_a_name_map():
    code, out = run_pytest(os.path.join("reference_tests", "test_model.py"), "--impl", "impls.renamed_params",
                           "-v", "-rA", "-k", "whole_model or adamw or batch_of_one")
    assert code == 0, out[-5000:]
    assert re.search(r"\b(\d+) passed", out) and "failed" not in out, out[-3000:]
