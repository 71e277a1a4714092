"""pytest configuration of the reference tests: implementation selection (--impl / MINIBVIT_IMPL),
convention profiles (--profile), component markers, the impl_specific marker, and the guards that
keep a run honest (no test module may import minibvit while another implementation is selected; no
test is reported green without having reached the implementation). docs/conformance.md explains it.
"""
import ast
import fnmatch
import importlib.util
import os
import sys

import numpy as np
import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from hypothesis import settings  # noqa: E402

settings.register_profile("ci", deadline=None, print_blob=True, derandomize=True)
settings.register_profile("dev", deadline=None, print_blob=True)
settings.load_profile("ci" if os.environ.get("CI") else os.environ.get("HYPOTHESIS_PROFILE", "dev"))

COMPONENTS = {
    "ops": "the op pairs (linear, LayerNorm, GELU, softmax, attention, patch embedding, losses, ...)",
    "quant": "generic quantizers (sign + STEs, weight binarizers, elastic, ternary, LSQ, min-max) and diagnostics",
    "binaryvit": "BinaryViT: GRS, ASM, threshold fold",
    "gsb": "GSB value and attention quantizers and the GSB models",
    "tervit": "TerViT's ternary models",
    "model": "the whole ViT (float and quantized) against the PyTorch reference",
    "optim": "AdamW, SGD, gradient clipping, the cosine schedule",
    "engine": "export and the packed inference engine",
    "kernels": "bit-packed kernels",
}
OTHER_MARKERS = {
    "impl_specific": "checks one of minibvit's internals (float32 summation order, exp_f32, memory sharing, "
                     "error-message wording, packed-file internals...); runs only for the minibvit implementation",
    "profile(name, *fields)": "the test's expected values follow convention profile `name` ('selected': the "
                              "--profile in force) in the listed fields of minibvit/conformance/profiles.py",
    "no_impl": "the test checks the test kit itself and need not reach the implementation",
}

# Modules that test minibvit itself (its CLI, files, data loaders, process settings, golden export):
# collected only when minibvit is the implementation under test.
MINIBVIT_ONLY_MODULES = ("test_checkpoint.py", "test_data.py", "test_train.py", "test_process_defaults.py",
                         "test_tutorials.py", "test_method_effects.py", "test_cost.py", "test_golden*.py",
                         "test_registry.py", "test_numerics.py", "test_imagenet.py", "test_loader.py",
                         "test_augment.py", "test_distributed.py", "test_hardening*.py",
                         "test_imagenet_scripts.py", "test_train_imagenet.py", "test_train_distributed.py",
                         "test_bench_scripts.py", "test_recipes.py", "test_switches.py", "test_cifar100.py",
                         "test_ternary_diagnostics.py", "test_reproduce.py", "test_binaryvit_switches.py",
                         "test_packed_int8.py", "test_fused_quant.py", "test_fused_train.py", "test_fused_tervit.py")

# Component of every test: module default, then the first matching test-name pattern.
MODULE_COMPONENTS = {
    "test_ops.py": ("ops", {}),
    "test_model.py": ("model", {"*adamw*": "optim", "*sgd*": "optim", "*cosine*": "optim"}),
    "test_quant.py": ("quant", {}),
    "test_methods.py": ("gsb", {"*grs*": "binaryvit", "*asm*": "binaryvit", "*diagnostics*": "quant"}),
    "test_quant_model.py": ("model", {"*gsb*": "gsb", "*tervit*": "tervit", "*binaryvit*": "binaryvit"}),
    "test_engine.py": ("engine", {}),
    "test_kernels.py": ("kernels", {}),
    "test_conformance_kit.py": (None, {}),
}

# Tests of minibvit's internals rather than of the contract (reason shown when skipped).
IMPL_SPECIFIC = {
    "test_ops.py": {
        "test_layernorm_float32_bits_are_in_order_sums": "float32 summation order, bit for bit",
        "test_float32_exp_is_rounded_float64_exp": "minibvit's exp_f32",
        "test_softmax_float32_bits_are_in_order_sums": "float32 summation order, bit for bit",
    },
    "test_model.py": {
        "test_state_dict_roundtrip_and_errors": "error-message wording",
        "test_bad_config_and_input_errors": "error-message wording",
        "test_no_python_loop_over_heads_tokens_or_samples": "how minibvit's model is written",
    },
    "test_quant.py": {
        "test_bad_inputs_raise_helpful_errors": "error-message wording",
        "test_factory_rejects_unknown_spec": "error-message wording",
    },
    "test_methods.py": {
        "test_gsb_bad_inputs_raise": "error-message wording",
        "test_gsb_wrappers_reject_bad_inputs": "error-message wording",
        "test_asm_state_fold_and_errors": "error-message wording",
    },
    "test_kernels.py": {
        "test_pack_signs_matches_reference_and_round_trips": "minibvit's bit layout and NumPy reference",
        "test_pack_signs_bit_order": "minibvit's bit layout",
        "test_pack_bits_matches_reference_and_round_trips": "minibvit's bit layout and NumPy reference",
        "test_packing_rejects_bad_input": "error-message wording",
        "test_binary_gemm_rejects_bad_input": "error-message wording",
        "test_ternary_rejects_bad_input": "error-message wording",
        "test_gsb_rejects_bad_shapes": "error-message wording",
        "test_popcount_matches_numpy": "minibvit's popcount intrinsic",
        "test_kernels_on_other_cpus": "minibvit's Numba CPU targets",
    },
    "test_engine.py": {
        "test_export_stores_packed_weights_thresholds_and_size": "packed-file internals",
        "test_export_ternary_planes": "packed-file internals",
        "test_token_centre_stores_shift_not_threshold": "packed-file internals",
        "test_export_refuses_methods_without_packed_form": "error-message wording",
        "test_export_refuses_uninitialised_scales": "error-message wording",
        "test_export_and_load_reject_corrupt_and_foreign_files": "packed-file internals",
        "test_forward_rejects_wrong_image_shape": "error-message wording",
        "test_transpose_bits64": "packed-engine internals",
        "test_layernorm_and_sign_pack_bit_exact": "packed-engine internals",
        "test_decision_intervals_reproduce_tables": "packed-engine internals",
        "test_softmax_bits_equal_ops_softmax_and_binarizer": "minibvit's float32 softmax bits",
        "test_float_fallback_paths_equal_simulated_forward": "packed-engine internals",
        "test_non_monotone_softmax_in_whole_network_kernel": "packed-engine internals",
        "test_cli_export_and_evaluate": "minibvit's command line",
    },
}


def _load_profiles():
    """minibvit/conformance/profiles.py, loaded by path: importing the minibvit package would run its
    __init__ (process settings) even when another implementation is under test."""
    path = os.path.join(os.path.dirname(HERE), "minibvit", "conformance", "profiles.py")
    spec = importlib.util.spec_from_file_location("conformance_profiles", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["conformance_profiles"] = module
    spec.loader.exec_module(module)
    return module


profiles = _load_profiles()


def pytest_addoption(parser):
    group = parser.getgroup("minibvit conformance")
    group.addoption("--impl", default=None, help="implementation under test: an importable module "
                    "(package.module) or a .py file providing the adapter contract (docs/conformance.md); "
                    "default $MINIBVIT_IMPL, else minibvit's own adapter (impls.minibvit_impl)")
    group.addoption("--profile", default=None, choices=sorted(profiles.PROFILES),
                    help="convention profile the implementation follows (default $MINIBVIT_PROFILE, else minibvit)")


def _minibvit_modules():
    return {name for name in sys.modules if name == "minibvit" or name.startswith("minibvit.")}


def pytest_configure(config):
    for name, text in COMPONENTS.items():
        config.addinivalue_line("markers", f"{name}: component: {text}")
    for name, text in OTHER_MARKERS.items():
        config.addinivalue_line("markers", f"{name}: {text}")
    impl = config.getoption("--impl", default=None)
    if impl:
        os.environ["MINIBVIT_IMPL"] = impl
    import adapter

    adapter.select(impl)
    config._minibvit_allowed = _minibvit_modules()  # whatever the implementation itself imported
    name = config.getoption("--profile", default=None) or os.environ.get("MINIBVIT_PROFILE", profiles.DEFAULT_PROFILE)
    config._conformance_profile = profiles.get_profile(name)
    adapter.set_profile(config._conformance_profile)


def pytest_report_header(config):
    import adapter

    lines = [f"implementation under test: {adapter.impl_name()}; convention profile: "
             f"{config._conformance_profile.name}"]
    if not adapter.is_minibvit():
        lines.append("tests of minibvit itself not collected: " + ", ".join(MINIBVIT_ONLY_MODULES))
    return lines


def _is_minibvit_only(path):
    return any(fnmatch.fnmatch(path.name, pattern) for pattern in MINIBVIT_ONLY_MODULES)


def pytest_ignore_collect(collection_path, config):
    import adapter

    if collection_path.suffix == ".py" and not adapter.is_minibvit() and _is_minibvit_only(collection_path):
        return True
    return None


def imports_of_minibvit(source):
    """(line, statement) of every import of minibvit in a module's source."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names = [node.module or ""]
        else:
            continue
        if any(n == "minibvit" or n.startswith("minibvit.") for n in names):
            found.append((node.lineno, ast.unparse(node)))
    return found


class ForeignImportError(Exception):
    """A test module imports minibvit while another implementation is under test."""


def _guard_message(where, what):
    import adapter

    return (f"{where} imports minibvit ({what}) while the implementation under test is {adapter.impl_name()}: "
            f"the test would check minibvit, not {adapter.impl_name()}. Tests must reach the implementation "
            f"only through reference_tests/adapter.py (from adapter import ...).")


@pytest.hookimpl(wrapper=True)
def pytest_make_collect_report(collector):
    import adapter

    if not isinstance(collector, pytest.Module) or adapter.is_minibvit():
        return (yield)
    before = _minibvit_modules()
    report = yield
    found = imports_of_minibvit(collector.path.read_text())
    new = _minibvit_modules() - before - collector.config._minibvit_allowed
    if found or new:
        what = "; ".join(f"line {n}: {s}" for n, s in found) or ", ".join(sorted(new))
        report.outcome = "failed"
        report.longrepr = _guard_message(collector.path.name, what)
        report.result = []
    return report


def _component(item):
    module = item.path.name
    default, patterns = MODULE_COMPONENTS.get(module, (None, {}))
    for pattern, component in patterns.items():
        if fnmatch.fnmatch(item.originalname, pattern):
            return component
    return default


def pytest_collection_modifyitems(config, items):
    import adapter

    profile = config._conformance_profile
    for item in items:
        component = _component(item)
        if component:
            item.add_marker(getattr(pytest.mark, component))
        reason = IMPL_SPECIFIC.get(item.path.name, {}).get(item.originalname)
        if reason:
            item.add_marker(pytest.mark.impl_specific(reason=reason))
        marker = item.get_closest_marker("impl_specific")
        if marker and not adapter.is_minibvit():
            why = marker.kwargs.get("reason", "an internal of minibvit")
            item.add_marker(pytest.mark.skip(reason=f"impl_specific ({why}): checks minibvit itself, "
                                                    f"not the contract; {adapter.impl_name()} is under test"))
        for marker in item.iter_markers("profile"):
            follows, fields = marker.args[0], marker.args[1:]
            if follows == "selected":
                continue
            differ = [f for f in fields if getattr(profiles.get_profile(follows), f) != getattr(profile, f)]
            if differ:
                item.add_marker(pytest.mark.skip(
                    reason=f"expected values follow profile {follows!r}, which differs from the selected "
                           f"profile {profile.name!r} in {', '.join(differ)}"))


@pytest.fixture
def profile(request):
    """The convention profile in force (--profile), a conformance_profiles.Profile."""
    return request.config._conformance_profile


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item):
    import adapter

    adapter.reset_used()
    before = _minibvit_modules()
    result = yield
    if not adapter.is_minibvit():
        new = _minibvit_modules() - before - item.config._minibvit_allowed
        if new:
            raise ForeignImportError(_guard_message(item.nodeid, ", ".join(sorted(new))))
    if _component(item) and not item.get_closest_marker("no_impl") and not adapter.used_names():
        raise AssertionError(f"{item.nodeid} passed without reaching the implementation under test "
                             f"({adapter.impl_name()}): nothing it checked came from the adapter")
    return result


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    if report.skipped and isinstance(report.longrepr, tuple) and report.longrepr[0].endswith("adapter.py"):
        report.longrepr = (str(item.path), (item.location[1] or 0) + 1, report.longrepr[2])  # the test, not the door
    if report.when == "call" and report.failed:
        import adapter

        used = sorted(adapter.used_names())
        lines = [f"implementation under test: {adapter.impl_name()}; profile: {item.config._conformance_profile.name}",
                 "contract names used: " + (", ".join(used[:12]) + (" ..." if len(used) > 12 else "") or "none")]
        for marker in item.iter_markers("profile"):
            follows = item.config._conformance_profile.name if marker.args[0] == "selected" else marker.args[0]
            lines.append(f"expected values follow convention profile {follows!r} in {', '.join(marker.args[1:])}; "
                         f"an implementation following another documented profile runs with --profile NAME "
                         f"(minibvit/conformance/profiles.py)")
        report.sections.append(("conformance", "\n".join(lines)))
    return report


@pytest.fixture
def rng():
    return np.random.default_rng(1234)
