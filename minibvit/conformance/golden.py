"""The golden-file format: one safetensors file per case plus ``manifest.json``, and ``check``.

A golden directory holds

    manifest.json            the schema below (FORMAT_NAME, FORMAT_VERSION)
    <case name>.safetensors  the case's inputs and expected outputs, one tensor per name

and a results directory written by an implementation holds ``<case name>.safetensors`` with that
implementation's outputs under the same names. Nothing else is needed to run a case: the manifest
says what each case computes (op or quantizer, attributes, convention profile) and how close each
output must be. docs/conformance.md documents the schema field by field.

This module needs only NumPy, safetensors and the standard library.
"""
import json
import math
import os
import tempfile

import numpy as np

FORMAT_NAME = "minibvit-golden"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"


# ----------------------------------------------------------------------------------------------
# reading and writing


def _safetensors_numpy():
    try:
        from safetensors import numpy as st_numpy
    except ImportError:  # a runtime dependency of minibvit, but say what to do if it is missing
        raise ImportError("golden files are safetensors: pip install safetensors") from None
    return st_numpy


def case_file(case):
    """The file name of a manifest entry (its ``file`` field)."""
    return case["file"]


def _write_atomic(path, data):
    """Write bytes to path through a temporary file in the same directory (no half-written file)."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=os.path.basename(path))
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_tensors(path, tensors, metadata=None):
    """Write {name: array} to a safetensors file, deterministically: safetensors orders the tensors
    itself, but writes a metadata map in hash order, so at most one metadata key is allowed."""
    if metadata and len(metadata) > 1:
        raise ValueError(f"at most one metadata key (safetensors writes several in random order), got {sorted(metadata)}")
    st_numpy = _safetensors_numpy()
    arrays = {k: np.array(tensors[k], order="C") for k in sorted(tensors)}  # (ascontiguousarray makes 0-d 1-d)
    _write_atomic(path, st_numpy.save(arrays, metadata=metadata or None))


def load_tensors(path):
    """{name: array} from a safetensors file; a clear error if the file is missing or unreadable."""
    if not os.path.exists(path):
        raise FileNotFoundError(path)
    st_numpy = _safetensors_numpy()
    try:
        return st_numpy.load_file(path)
    except Exception as exc:
        raise ValueError(f"{path} is not a readable safetensors file: {exc}") from None


def manifest_bytes(manifest):
    """The canonical JSON text of a manifest: sorted keys, two-space indent, trailing newline."""
    return (json.dumps(manifest, indent=2, sort_keys=True, allow_nan=False) + "\n").encode()


def write_manifest(directory, manifest):
    _write_atomic(os.path.join(directory, MANIFEST), manifest_bytes(manifest))


def read_manifest(directory):
    """The manifest of a golden directory, checked for format name and version."""
    path = os.path.join(directory, MANIFEST)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} not found: is {directory!r} a golden directory written by "
                                f"`python -m minibvit.conformance export`?")
    with open(path) as f:
        manifest = json.load(f)
    if manifest.get("format") != FORMAT_NAME:
        raise ValueError(f"{path}: format {manifest.get('format')!r}, expected {FORMAT_NAME!r}")
    if manifest.get("version") != FORMAT_VERSION:
        raise ValueError(f"{path}: format version {manifest.get('version')!r}; this minibvit reads version "
                         f"{FORMAT_VERSION} (regenerate the golden set or update minibvit)")
    return manifest


def select(cases, patterns):
    """The cases whose name matches any of the shell-style patterns (all when patterns is empty);
    a pattern that matches nothing is an error (a typo must not silently select nothing)."""
    from fnmatch import fnmatchcase

    if not patterns:
        return list(cases)
    unmatched = [p for p in patterns if not any(fnmatchcase(c["name"], p) for c in cases)]
    if unmatched:
        raise ValueError(f"no case matches {unmatched}; case names look like "
                         f"{', '.join(c['name'] for c in cases[:3])}, ...")
    return [c for c in cases if any(fnmatchcase(c["name"], p) for p in patterns)]


# ----------------------------------------------------------------------------------------------
# comparing


def compare(expected, actual, rtol, atol):
    """(passed, max_abs_error, max_rel_error, reason) for one output.

    Passes when shapes match and |actual - expected| <= atol + rtol |expected| elementwise
    (numpy.isclose), NaN matching NaN only where expected is NaN; integer outputs must be equal.
    The relative error is max |a - e| / |e| over the elements with |e| > atol (where a relative
    error means something: a gradient that is exactly 0 in exact arithmetic has none)."""
    expected, actual = np.asarray(expected), np.asarray(actual)
    if expected.shape != actual.shape:
        return False, math.inf, math.inf, f"shape {actual.shape}, expected {expected.shape}"
    if expected.size == 0:
        return True, 0.0, 0.0, ""
    e, a = expected.astype(np.float64), actual.astype(np.float64)
    both_nan = np.isnan(e) & np.isnan(a)
    with np.errstate(invalid="ignore", divide="ignore"):
        err = np.where(both_nan, 0.0, np.abs(a - e))
        err = np.where(np.isnan(err), math.inf, err)
        big = np.abs(e) > atol
        rel = np.where(big, err / np.where(big, np.abs(e), 1.0), 0.0)
    if expected.dtype.kind in "iub":
        ok = bool(np.array_equal(e, a))
    else:
        ok = bool(np.all(both_nan | (err <= atol + rtol * np.abs(e))))
    reason = ""
    if not ok:
        worst = worst_index(e, a, rtol, atol)
        reason = f"at index {worst}: got {float(a[worst])!r}, expected {float(e[worst])!r}"
    return ok, float(err.max()), float(rel.max()), reason


def worst_index(expected, actual, rtol, atol):
    """Index of the element that exceeds its tolerance |a - e| <= atol + rtol |e| the most."""
    e, a = np.asarray(expected, np.float64), np.asarray(actual, np.float64)
    with np.errstate(invalid="ignore"):
        err = np.abs(a - e)
        excess = np.where(np.isfinite(err), err - (atol + rtol * np.where(np.isfinite(e), np.abs(e), 0)), math.inf)
    excess = np.where(np.isnan(e) & np.isnan(a), -math.inf, excess)
    return tuple(int(i) for i in np.unravel_index(int(np.argmax(excess)), e.shape))


def _inputs_at(case, tensors, expected, actual, tol):
    """'; inputs there: x=..., ...' for the inputs shaped like the output, at its worst element."""
    if expected.shape != np.shape(actual) or expected.size == 0:
        return ""
    worst = worst_index(expected, actual, tol["rtol"], tol["atol"])
    same = [k for k in sorted(case["inputs"]) if k != "dout" and tensors[k].shape == expected.shape]
    return ("; inputs there: " + ", ".join(f"{k}={float(tensors[k][worst])!r}" for k in same)) if same else ""


def check(golden_dir, results_dir, patterns=(), out=print, verbose=False):
    """Compare every selected case's outputs in results_dir with the golden expected values.

    Prints one row per case (outputs compared, max abs and rel error over them, PASS/FAIL), below a
    failed case one row per failed output with its tolerance and where it failed (every output with
    verbose), then a summary line. A missing results file or output name is a failure.
    Returns the number of failed outputs (0: everything passed)."""
    manifest = read_manifest(golden_dir)
    cases = select(manifest["cases"], patterns)
    width = max([len(c["name"]) for c in cases] + [24]) + 2
    out(f"{'case / output':<{width}} {'outputs':>7}  {'max abs err':>11}  {'max rel err':>11}  result")
    failures = failed_cases = checked = 0
    for case in cases:
        expected = load_tensors(os.path.join(golden_dir, case_file(case)))
        path = os.path.join(results_dir, case_file(case))
        actual = load_tensors(path) if os.path.exists(path) else None
        rows = []
        for name, tol in sorted(case["outputs"].items()):
            if actual is None:
                row = (False, math.nan, math.nan, f"missing results file {path}")
            elif name not in actual:
                row = (False, math.nan, math.nan, "missing output")
            else:
                row = compare(expected[name], actual[name], tol["rtol"], tol["atol"])
                if not row[0]:
                    row = row[:3] + (row[3] + _inputs_at(case, expected, expected[name], actual[name], tol),)
            rows.append((name, tol) + row)
        bad = [r for r in rows if not r[2]]
        checked += len(rows)
        failures += len(bad)
        failed_cases += bool(bad)
        compared = [r for r in rows if not math.isnan(r[3])]  # missing outputs have no error to show
        abs_err = max((r[3] for r in compared), default=math.nan)
        rel_err = max((r[4] for r in compared), default=math.nan)
        out(f"{case['name']:<{width}} {len(rows):>7}  {abs_err:11.3e}  {rel_err:11.3e}  {'FAIL' if bad else 'PASS'}")
        for name, tol, ok, a_err, r_err, reason in (rows if verbose else bad):
            out(f"  {name:<{width - 2}} {'':>7}  {a_err:11.3e}  {r_err:11.3e}  {'PASS' if ok else 'FAIL'}"
                f"  (rtol {tol['rtol']:g}, atol {tol['atol']:g})" + (f"  {reason}" if reason else ""))
    out(f"{len(cases)} cases, {checked} outputs: {checked - failures} passed, {failures} failed"
        + (f" (in {failed_cases} case{'' if failed_cases == 1 else 's'})" if failures else ""))
    return failures


# ----------------------------------------------------------------------------------------------
# running an implementation written in Python

def load_runner(impl):
    """run_case(case, inputs) -> {output: array} of an implementation: ``minibvit``; a module (dotted
    path, or a .py file) defining ``run_case``; or a module with the names of the pytest adapter contract
    (``ops``, ``quant``, ...; docs/conformance.md), driven by minibvit.conformance.runner."""
    import functools
    import importlib
    import importlib.util

    from . import runner

    if impl == "minibvit":
        return runner.run_case
    try:
        if impl.endswith(".py"):
            if not os.path.isfile(impl):
                raise ImportError(f"no such file {impl}")
            spec = importlib.util.spec_from_file_location(os.path.splitext(os.path.basename(impl))[0], impl)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
        else:
            module = importlib.import_module(impl)
    except ImportError as exc:
        raise ImportError(f"--impl {impl!r}: cannot import it ({exc}); give 'minibvit', a module path on "
                          f"PYTHONPATH or a .py file") from None
    if callable(getattr(module, "run_case", None)):
        return module.run_case
    if any(hasattr(module, name) for name in ("ops", "quant", "build_vit")):
        return functools.partial(runner.run_case, ns=module)
    raise ValueError(f"--impl {impl!r} defines neither run_case(case, inputs) nor the adapter contract's names "
                     f"(ops, quant, methods, schemes, ViTConfig, build_vit, AdamW)")


def run(golden_dir, results_dir, impl="minibvit", patterns=(), out=print):
    """Compute an implementation's outputs for the selected cases and write them to results_dir,
    one file per case under the golden file's name. A case that raises is reported and skipped
    (check then fails it as missing). Returns the number of cases that raised."""
    run_case = load_runner(impl)
    manifest = read_manifest(golden_dir)
    cases = select(manifest["cases"], patterns)
    os.makedirs(results_dir, exist_ok=True)
    errors = 0
    for case in cases:
        tensors = load_tensors(os.path.join(golden_dir, case_file(case)))
        inputs = {k: tensors[k] for k in case["inputs"]}
        try:
            outputs = run_case(case, inputs)
        except Exception as exc:  # report and go on: check fails the case as missing
            errors += 1
            out(f"{case['name']}: {type(exc).__name__}: {exc}")
            continue
        save_tensors(os.path.join(results_dir, case_file(case)), {k: np.asarray(v) for k, v in outputs.items()},
                     metadata={"case": case["name"]})
    out(f"ran {len(cases) - errors} of {len(cases)} cases with {impl!r} into {results_dir}"
        + (f"; {errors} raised" if errors else ""))
    return errors
