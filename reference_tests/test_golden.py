"""The committed golden set (reference_tests/golden/): regenerated bit for bit from the PyTorch
references, passed by minibvit's own outputs, by a plain-torch runner and (when JAX is installed) a
JAX runner, failed by the broken adapter's bugs; and `check` fails wrong, missing and absent outputs.

Export, run and the torch runner each run in a fresh process (`python -m minibvit.conformance ...`):
the export pins torch's kernels and threads before torch is imported, which is only possible there.
"""
import ast
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GOLDEN = os.path.join(ROOT, "reference_tests", "golden")
sys.path.insert(0, ROOT)

from minibvit.conformance import golden  # noqa: E402  (NumPy and safetensors only)

pytestmark = pytest.mark.impl_specific  # tests minibvit itself (conftest.py: MINIBVIT_ONLY_MODULES)

pytest.importorskip("torch", reason="the golden references are computed with PyTorch (pip install torch==2.13.0)")

# the cases the plain-torch and JAX runners cover
RUNNER_CASES = ("op.*", "quant.sign", "quant.w_binary", "quant.a_elastic_*", "quant.w_ternary_*", "quant.a_lsq8*",
               "quant.*minmax8*", "model.fp")


def cli(*args, check=True, path=()):
    """Run a command in a fresh Python process from the repository root (plus `path` on PYTHONPATH);
    returns (returncode, output)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([ROOT, *path, os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(args)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
    return proc.returncode, proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def minibvit_results(tmp_path_factory):
    results = str(tmp_path_factory.mktemp("minibvit_results"))
    cli("-m", "minibvit.conformance", "run", GOLDEN, results)
    return results


REGENERATED_TOLERANCE = 0.01
"""On another CPU, the fraction of each output's own tolerance within which a regenerated expected value
must lie (PyTorch's float64 kernels round differently from one CPU to another: the AMD EPYC machine
regenerated the model cases within 1e-3 of their tolerances, the rest bit for bit)."""


def test_export_regenerates_the_committed_golden_set(tmp_path):
    """Bit for bit: the file list, the manifest, every case's inputs and the names, dtypes and shapes of
    its outputs. The expected outputs too on the CPU that exported them; elsewhere within
    REGENERATED_TOLERANCE of their tolerances."""
    cli("-m", "minibvit.conformance", "export", str(tmp_path))
    committed, fresh = sorted(os.listdir(GOLDEN)), sorted(os.listdir(tmp_path))
    assert fresh == committed, f"files differ: only committed {sorted(set(committed) - set(fresh))}, " \
                               f"only regenerated {sorted(set(fresh) - set(committed))}"
    redo = "if the references changed on purpose, re-export: python -m minibvit.conformance export reference_tests/golden"
    manifest = golden.read_manifest(GOLDEN)
    case_files = {golden.case_file(case) for case in manifest["cases"]}
    for name in sorted(set(committed) - case_files):
        assert open(os.path.join(GOLDEN, name), "rb").read() == open(os.path.join(tmp_path, name), "rb").read(), \
            f"regenerated {name} differs from the committed one; {redo}"
    differ = []
    for case in manifest["cases"]:
        want = golden.load_tensors(os.path.join(GOLDEN, golden.case_file(case)))
        got = golden.load_tensors(os.path.join(tmp_path, golden.case_file(case)))
        assert got.keys() == want.keys(), f"{case['name']}: tensors {sorted(got)}, committed {sorted(want)}; {redo}"
        for key in sorted(want):
            a, b = want[key], got[key]
            assert a.dtype == b.dtype and a.shape == b.shape, f"{case['name']}/{key}: {b.dtype}{b.shape}, " \
                                                              f"committed {a.dtype}{a.shape}; {redo}"
            if a.tobytes() == b.tobytes():
                continue
            tol = case["outputs"].get(key)
            assert tol is not None, f"{case['name']}: input {key} regenerated with other values; {redo}"
            ok, abs_err, rel_err, reason = golden.compare(a, b, REGENERATED_TOLERANCE * tol["rtol"],
                                                          REGENERATED_TOLERANCE * tol["atol"])
            if not ok:
                differ.append(f"{case['name']}/{key} ({reason})")
    assert not differ, f"regenerated expected outputs outside {REGENERATED_TOLERANCE} of their tolerances: {differ}; {redo}"


def test_regeneration_check_fails_a_changed_output(tmp_path):
    """The comparison above fails an expected output moved by a tenth of its tolerance."""
    case = next(c for c in golden.read_manifest(GOLDEN)["cases"] if c["name"] == "op.linear")
    want = golden.load_tensors(os.path.join(GOLDEN, golden.case_file(case)))["out"]
    tol = case["outputs"]["out"]
    moved = want + 0.1 * (tol["atol"] + tol["rtol"] * np.abs(want))
    assert golden.compare(want, moved, tol["rtol"], tol["atol"])[0], "within the tolerance itself"
    assert not golden.compare(want, moved, REGENERATED_TOLERANCE * tol["rtol"], REGENERATED_TOLERANCE * tol["atol"])[0]


def test_export_leaves_only_its_own_files(tmp_path):
    """A re-export with fewer cases removes the files of the cases it no longer lists, and nothing else."""
    shutil.copytree(GOLDEN, tmp_path / "g")
    (tmp_path / "g" / "notes.txt").write_text("not a case file")
    cli("-m", "minibvit.conformance", "export", str(tmp_path / "g"), "--cases", "op.linear*")
    assert sorted(os.listdir(tmp_path / "g")) == ["manifest.json", "notes.txt", "op.linear.safetensors",
                                                  "op.linear_nobias.safetensors"]


def test_committed_set_is_small_and_complete():
    manifest = golden.read_manifest(GOLDEN)
    size = sum(os.path.getsize(os.path.join(GOLDEN, f)) for f in os.listdir(GOLDEN))
    assert size < 3e6, f"the golden set grew to {size / 1e6:.1f} MB"
    names = {c["name"] for c in manifest["cases"]}
    ops = {c["op"] for c in manifest["cases"] if c["kind"] == "op"}
    assert ops >= {"linear", "layernorm", "gelu", "softmax", "attention", "patch_embed", "tokens", "pool", "residual",
                   "dropout", "drop_path", "cross_entropy", "kd_soft"}
    specs = {c["op"] for c in manifest["cases"] if c["kind"] == "quantizer"}
    assert specs >= {"sign", "w_binary", "w_xnor", "a_elastic_signed", "a_elastic_signed_gsb", "a_elastic_unsigned",
                     "w_ternary_channel", "w_ternary_tensor", "a_lsq8", "w_lsq8", "w_minmax8", "a_minmax8_signed",
                     "a_minmax8_unsigned", "asm:a_elastic_signed", "gsb_value", "gsb_attn"}
    assert {f"model.{m}" for m in ("fp", "binary", "binaryvit", "tervit", "gsb")} <= names
    for case in manifest["cases"]:
        assert case["profile"] in manifest["profiles"], f"{case['name']}: profile {case['profile']!r} not described"
        tensors = golden.load_tensors(os.path.join(GOLDEN, case["file"]))
        assert set(tensors) == set(case["inputs"]) | set(case["outputs"]), f"{case['name']}: names differ from the manifest"
        for name, spec in {**case["inputs"], **case["outputs"]}.items():
            assert [str(tensors[name].dtype), list(tensors[name].shape)] == [spec["dtype"], spec["shape"]], name
        if case["kind"] == "model":
            params = {k[len("state."):] for k in case["inputs"] if k.startswith("state.")}
            grads = {k[len("grad."):] for k in case["outputs"] if k.startswith("grad.")}
            after = {k[len("after."):] for k in case["outputs"] if k.startswith("after.")}
            assert after == params and grads and grads <= params, f"{case['name']}: state, grad and after names"


def test_minibvit_outputs_pass_check(minibvit_results):
    code, output = cli("-m", "minibvit.conformance", "check", GOLDEN, minibvit_results, check=False)
    assert code == 0, output
    manifest = golden.read_manifest(GOLDEN)
    outputs = sum(len(c["outputs"]) for c in manifest["cases"])
    assert f"{len(manifest['cases'])} cases, {outputs} outputs: {outputs} passed, 0 failed" in output


def test_edge_cases_are_in_the_files():
    """The edge inputs the manifest promises are really there (exact zeros, values on thresholds)."""
    sign = golden.load_tensors(os.path.join(GOLDEN, "quant.sign.safetensors"))
    assert (sign["x"] == 0).any() and (np.abs(sign["x"]) == 1).any()
    tern = golden.load_tensors(os.path.join(GOLDEN, "quant.w_ternary_channel.safetensors"))
    assert (np.abs(tern["x"][0]) == np.float64(0.7) * np.abs(tern["x"][0]).mean()).any()
    assert (tern["x"] == 0).all(axis=1).any()
    empty = golden.load_tensors(os.path.join(GOLDEN, "quant.gsb_value.official.empty_groups.safetensors"))
    assert (empty["x"] == 0).all() and (empty["dalpha"][1:] == 0).all()


def _copy_results(src, dst, names):
    os.makedirs(dst, exist_ok=True)
    for name in names:
        shutil.copy(os.path.join(src, f"{name}.safetensors"), dst)


def test_check_fails_wrong_missing_and_absent_outputs(minibvit_results, tmp_path):
    """Results as a buggy implementation would write them fail, naming the case and output: sign(0) = 0,
    a clipped STE with < for <=, a missing output, a missing file."""
    cases = ["quant.sign", "op.layernorm", "op.gelu_erf"]
    _copy_results(minibvit_results, tmp_path, cases)
    path = os.path.join(tmp_path, "quant.sign.safetensors")
    inputs = golden.load_tensors(os.path.join(GOLDEN, "quant.sign.safetensors"))
    good = golden.load_tensors(path)
    zero, edge = inputs["x"] == 0, np.abs(inputs["x"]) == 1
    bad = {"out": np.where(zero, 0.0, good["out"]), "dx": np.where(edge, 0.0, good["dx"])}
    assert not np.array_equal(bad["out"], good["out"]) and not np.array_equal(bad["dx"], good["dx"])
    golden.save_tensors(path, bad)
    ln = golden.load_tensors(os.path.join(tmp_path, "op.layernorm.safetensors"))
    del ln["dgamma"]
    golden.save_tensors(os.path.join(tmp_path, "op.layernorm.safetensors"), ln)
    lines = []
    failures = golden.check(GOLDEN, str(tmp_path), ["quant.sign", "op.layernorm", "op.gelu_*"], out=lines.append)
    table = "\n".join(lines)
    assert failures == 5, table  # sign out, sign dx, layernorm dgamma, gelu_tanh out and dx (no file)
    rows, case = {}, None
    for line in lines[1:-1]:  # a case row, then an indented row per failed output
        if line.startswith("  "):
            rows[(case, line.split()[0])] = line
        else:
            case = line.split()[0]
            rows[case] = line
    assert rows["quant.sign"].endswith("FAIL") and rows["op.layernorm"].endswith("FAIL")
    assert rows["op.gelu_tanh"].endswith("FAIL") and rows["op.gelu_erf"].endswith("PASS")
    assert "FAIL" in rows[("quant.sign", "out")] and "got 0.0, expected 1.0" in rows[("quant.sign", "out")]
    assert "inputs there: x=0.0" in rows[("quant.sign", "out")] or "inputs there: x=-0.0" in rows[("quant.sign", "out")]
    dx_row = rows[("quant.sign", "dx")]
    assert "FAIL" in dx_row and ("x=1.0" in dx_row or "x=-1.0" in dx_row)
    assert "missing output" in rows[("op.layernorm", "dgamma")] and ("op.layernorm", "dx") not in rows
    assert "missing results file" in rows[("op.gelu_tanh", "out")]
    code, output = cli("-m", "minibvit.conformance", "check", GOLDEN, str(tmp_path), "--cases", "quant.sign", check=False)
    assert code == 1 and "FAIL" in output
    code, output = cli("-m", "minibvit.conformance", "check", GOLDEN, str(tmp_path), "--cases", "no.such.case", check=False)
    assert code == 2 and "no case matches" in output


def test_broken_adapter_fails_each_bug_on_the_golden_files(tmp_path):
    """The pytest adapter of the deliberately broken implementation (reference_tests/impls/broken.py),
    run on the golden files through the contract runner: each planted bug fails its case and output,
    the op it lacks (kd_soft) fails as missing, and the untouched ops pass."""
    code, output = cli("-m", "minibvit.conformance", "run", GOLDEN, str(tmp_path), "--impl", "impls.broken",
                       "--cases", "op.*", "quant.sign", check=False, path=[os.path.join(ROOT, "reference_tests")])
    assert code == 1
    assert "op.kd_soft: AttributeError" in output, output
    lines = []
    golden.check(GOLDEN, str(tmp_path), ["op.*", "quant.sign"], out=lines.append)
    failed, case = set(), None
    for line in lines[1:-1]:
        if line.startswith("  "):
            failed.add((case, line.split()[0]))
        else:
            case = line.split()[0]
    assert failed == {("op.layernorm", "dx"), ("op.gelu_erf", "dx"), ("op.gelu_tanh", "dx"), ("quant.sign", "out"),
                      ("quant.sign", "dx"), ("op.kd_soft", "loss"), ("op.kd_soft", "dstudent")}, "\n".join(lines)


def test_run_takes_a_run_case_module_by_file(tmp_path):
    """--impl path/to/file.py defining run_case(case, inputs): its outputs are written and checked; a case
    it raises on is reported, run exits 1 and check fails that case as missing."""
    impl = tmp_path / "my_impl.py"
    impl.write_text(
        "import os\nfrom minibvit.conformance import golden\n"
        f"GOLDEN = {GOLDEN!r}\n"
        "def run_case(case, inputs):\n"
        "    if case['name'] == 'op.softmax':\n"
        "        raise NotImplementedError('no softmax here')\n"
        "    expected = golden.load_tensors(os.path.join(GOLDEN, case['file']))\n"
        "    return {k: expected[k] for k in case['outputs']}\n")
    results = tmp_path / "results"
    code, output = cli("-m", "minibvit.conformance", "run", GOLDEN, str(results), "--impl", str(impl),
                       "--cases", "op.soft*", "op.residual", check=False)
    assert code == 1 and "op.softmax: NotImplementedError: no softmax here" in output, output
    lines = []
    assert golden.check(GOLDEN, str(results), ["op.softmax", "op.residual"], out=lines.append) == 2
    assert lines[-1] == "2 cases, 5 outputs: 3 passed, 2 failed (in 1 case)", lines


def test_plain_torch_runner_passes_check(tmp_path):
    """scripts/conformance_torch_runner.py (safetensors' torch API, torch ops only, no minibvit) on the
    op cases, the generic quantizers and the float model."""
    cli("scripts/conformance_torch_runner.py", GOLDEN, str(tmp_path), "--cases", *RUNNER_CASES)
    code, output = cli("-m", "minibvit.conformance", "check", GOLDEN, str(tmp_path), "--cases", *RUNNER_CASES, check=False)
    assert code == 0, output
    with open(os.path.join(ROOT, "scripts", "conformance_torch_runner.py")) as f:
        source = f.read()
    assert "import minibvit" not in source and "from minibvit" not in source
    manifest = json.load(open(os.path.join(GOLDEN, golden.MANIFEST)))
    assert len(golden.select(manifest["cases"], RUNNER_CASES)) >= 30


def _jax_python():
    """A Python with JAX and safetensors: $MINIBVIT_JAX_PYTHON, else this one if it has JAX."""
    if os.environ.get("MINIBVIT_JAX_PYTHON"):
        return os.environ["MINIBVIT_JAX_PYTHON"]
    import importlib.util

    return sys.executable if importlib.util.find_spec("jax") else None


@pytest.mark.skipif(_jax_python() is None, reason="JAX is not installed (pip install jax, or set MINIBVIT_JAX_PYTHON "
                                                   "to a Python that has jax and safetensors)")
def test_jax_runner_passes_check(tmp_path):
    """scripts/conformance_jax_runner.py (safetensors' flax API, jax.numpy only) on the same cases."""
    proc = subprocess.run([_jax_python(), "scripts/conformance_jax_runner.py", GOLDEN, str(tmp_path), "--cases",
                           *RUNNER_CASES], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    code, output = cli("-m", "minibvit.conformance", "check", GOLDEN, str(tmp_path), "--cases", *RUNNER_CASES, check=False)
    assert code == 0, output


def test_references_do_not_import_minibvit():
    """The PyTorch references the golden values come from share no code with minibvit: they import
    only the standard library, NumPy and torch."""
    for name in ("torch_reference.py", "torch_quant.py"):
        with open(os.path.join(ROOT, "reference_tests", name)) as f:
            tree = ast.parse(f.read())
        imported = {a.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import) for a in node.names}
        imported |= {(node.module or ".").split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
        assert imported <= {"math", "numpy", "torch"}, f"{name} imports {sorted(imported)}"
