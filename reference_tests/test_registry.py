"""The method registry (minibvit.methods): every method resolves; options that do not apply are
refused; GRS composes with any binary method and is off by default outside BinaryViT; the registry,
not name comparisons, drives the trainer and the cost model; one quantizer-input recorder."""
import os
import re

import numpy as np
import pytest

from minibvit import binaryvit, cost, diagnostics, gsb, methods, ops, quant, train
from minibvit.model import ViT, ViTConfig
from minibvit.optim import AdamW

pytestmark = pytest.mark.impl_specific  # tests minibvit itself (conftest.py: MINIBVIT_ONLY_MODULES)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = dict(image_size=16, patch_size=8, in_chans=3, num_classes=4, embed_dim=16, depth=1, num_heads=2, mlp_ratio=2.0)


def tiny_cfg(distilled=False):
    return ViTConfig(**TINY, distilled=distilled)


@pytest.mark.parametrize("name", list(methods.METHODS))
def test_every_method_resolves(name):
    m = methods.get_method(name)
    seen = set()
    for stage in m.stages:
        assert stage.init is None or stage.init in seen, f"{name}: {stage.name} starts from a later stage"
        seen.add(stage.name)
        assert stage.kd in methods.KD_KINDS and set(stage.hooks) <= set(methods.HOOKS)
        table = stage.quantizer_table
        assert table.packed in methods.PACKED_KINDS
        cfg = tiny_cfg(stage.distilled)
        quantizers = methods.build_quantizers(cfg, stage.table, dtype="float64")
        assert set(quantizers) == set(methods.resolve(cfg, stage.table))
        model = ViT(cfg, quantizers=quantizers, dtype=np.float64)
        x = np.random.default_rng(0).standard_normal((2, 3, 16, 16))
        logits, _ = model.forward(x, training=True)
        assert np.all(np.isfinite(logits[0] if isinstance(logits, tuple) else logits))
    assert set(m.options) <= {o.name for o in methods.OPTIONS}
    assert m.distillation == m.final.kd


def test_registry_records():
    assert list(methods.METHODS) == ["fp", "binary", "binaryvit", "gsb", "tervit"]
    assert {n: m.packed for n, m in methods.METHODS.items()} == {
        "fp": None, "binary": "binary", "binaryvit": "binary", "gsb": "gsb", "tervit": "ternary"}
    assert methods.TABLES["gsb_stage1"].packed is None and methods.TABLES["tervit_w8a8"].packed is None
    assert methods.METHODS["binaryvit"].hooks == ("grs",)
    assert all(m.hooks == () for n, m in methods.METHODS.items() if n != "binaryvit")
    assert methods.METHODS["gsb"].final.distilled and methods.METHODS["gsb"].distillation == "hard"
    with pytest.raises(ValueError, match="unknown method 'xnor'"):
        methods.get_method("xnor")
    with pytest.raises(ValueError, match="unknown quantizer table"):
        methods.Stage("x", "no_such_table")
    with pytest.raises(ValueError, match="packed"):
        methods.QuantizerTable("x", {}, packed="int4")
    with pytest.raises(ValueError, match="unknown quantizer spec"):
        methods.QuantizerTable("x", {"blocks.*.weight": "w_int3"})


def test_engine_exports_exactly_the_packed_tables():
    from minibvit import engine

    exportable = getattr(engine, "EXPORTABLE_SCHEMES", None)
    if exportable is None:
        pytest.skip("the engine reads QuantizerTable.packed itself")
    assert set(exportable) == {name for name, t in methods.TABLES.items() if t.packed}


@pytest.mark.parametrize("method, option, value", [
    ("binary", "gsb_mode", "principled"), ("binary", "asm_center", "median"), ("fp", "grs_lambda", 0.01),
    ("tervit", "kd_alpha", 0.3), ("gsb", "asm_momentum", 0.2), ("gsb", "kd_temperature", 2.0),
    ("fp", "gsb_max_over", "row")])
def test_options_that_do_not_apply_are_refused(method, option, value):
    flag = "--" + option.replace("_", "-")
    with pytest.raises(ValueError, match=f"{flag} do\\(es\\) not apply to --method {method}"):
        train.resolve_config(train.TrainConfig(method=method, dataset="synthetic", **{option: value}))


def test_options_that_apply_are_taken_and_defaults_filled():
    cfg = train.resolve_config(train.TrainConfig(method="binary", dataset="synthetic", grs_lambda=0.02))
    assert cfg.grs_lambda == 0.02 and cfg.grs_variant == binaryvit.GRS_DEFAULT_VARIANT
    cfg = train.resolve_config(train.TrainConfig(method="binaryvit", dataset="synthetic", asm_momentum=0.25))
    assert train.quantizer_options(cfg).asm_momentum == 0.25 and cfg.grs_lambda is None
    with pytest.raises(ValueError, match="--asm-momentum must be in"):
        train.resolve_config(train.TrainConfig(method="binaryvit", dataset="synthetic", asm_momentum=1.5))
    with pytest.raises(ValueError, match="--gsb-mode must be one of"):
        train.resolve_config(train.TrainConfig(method="gsb", dataset="synthetic", gsb_mode="paper"))


def test_cli_refuses_an_option_of_another_method():
    assert train.main(["--method", "binary", "--gsb-mode", "official", "--dataset", "synthetic"]) == 2


def test_help_gives_every_flag_help_and_one_default():
    text = train._parser().format_help()
    for action in train._parser()._actions:
        if action.option_strings and action.dest != "help":
            assert action.help, f"{action.option_strings} has no help"
            assert action.help.count("(default:") <= 1
            if action.default is not False:
                assert action.help.count("(default:") == 1, action.option_strings
    assert "(default: None)" not in text and "by dataset) (default" not in text
    args = train._parser().parse_args(["--asm-momentum", "0.3", "--method", "binaryvit"])
    assert args.asm_momentum == 0.3


def test_one_asm_centre_default():
    inner = quant.ElasticBinarizer()
    assert binaryvit.ASM(inner, 4).center == methods.QuantizerOptions().asm_center \
        == methods.OPTION_BY_NAME["asm_center"].default == binaryvit.ASM_DEFAULT_CENTER == "mean"


# ------------------------------------------------------------------------------------------------
# GRS as a gradient hook
# ------------------------------------------------------------------------------------------------

def _binary_model(table="binary", seed=0):
    cfg = tiny_cfg()
    return ViT(cfg, quantizers=methods.build_quantizers(cfg, table, dtype="float64"), dtype=np.float64, seed=seed)


def _step_grads(table, hooks):
    model = _binary_model(table)
    rng = np.random.default_rng(1)
    x, y = rng.standard_normal((4, 3, 16, 16)), rng.integers(0, 4, 4)
    opt = AdamW(model.parameters(), lr=1e-3)

    def loss_fn(logits, y, _):
        loss, c = ops.cross_entropy_forward(logits, y)
        return loss, ops.cross_entropy_backward(1.0, c)

    before = {k: v.copy() for k, v in model.params.items()}
    train.train_step(model, opt, x, y, lr=1e-3, rng=None, loss_fn=loss_fn, hooks=hooks, step=0)
    return model, before


def test_grs_hook_defaults():
    quantizers = _binary_model().quantizers
    stages = {s.table: s for m in methods.METHODS.values() for s in m.stages}
    assert methods.gradient_hooks(stages["binary"], quantizers) == []  # binary keeps GRS off
    assert methods.gradient_hooks(stages["binary"], quantizers, grs_lambda=0.0) == []
    (hook,) = methods.gradient_hooks(stages["binaryvit"], quantizers)  # binaryvit keeps GRS on
    assert hook.lam == binaryvit.GRS_DEFAULT_LAMBDA
    assert methods.gradient_hooks(stages["binaryvit"], quantizers, grs_lambda=0.0) == []
    (hook,) = methods.gradient_hooks(stages["binary"], quantizers, grs_lambda=0.05)  # GRS composes
    assert hook.lam == 0.05 and hook.roles == methods.binarized_weight_roles(quantizers)
    assert methods.gradient_hooks(stages["fp"], {}, grs_lambda=0.05) == []  # nothing binarized


def test_grs_on_binary_adds_the_pulled_back_gradient():
    """GRS on the binary method changes exactly the binarized weights' gradients, by dR/dW of
    R = (lam/2) sum (|W_c| - alpha)^2 through the centring W_c = W - mean W (alpha constant),
    checked against PyTorch autograd; GRS off leaves the step untouched (same bits as no hook)."""
    torch = pytest.importorskip("torch")
    lam = 0.05
    off, _ = _step_grads("binary", [])
    none, _ = _step_grads("binary", methods.gradient_hooks(methods.METHODS["binary"].final, off.quantizers))
    for k in off.grads:
        np.testing.assert_array_equal(off.grads[k], none.grads[k])
    for k, v in off.state_dict().items():
        np.testing.assert_array_equal(v, none.state_dict()[k])
    roles = methods.binarized_weight_roles(off.quantizers)
    on, before = _step_grads("binary", [binaryvit.GRSHook(roles, lam)])
    for k in off.grads:
        if k not in roles:
            np.testing.assert_array_equal(on.grads[k], off.grads[k])
            continue
        w = torch.tensor(before[k], requires_grad=True)
        wc = w - w.mean(dim=1, keepdim=True)
        alpha = wc.abs().mean(dim=1, keepdim=True).detach()
        (lam / 2 * ((wc.abs() - alpha) ** 2).sum()).backward()
        np.testing.assert_allclose(on.grads[k] - off.grads[k], w.grad.numpy(), rtol=1e-10, atol=1e-15)
        assert np.abs(w.grad.numpy()).max() > 0


def test_grs_lambda_on_binary_changes_training(tmp_path):
    def run(tag, **kw):
        cfg = train.TrainConfig(dataset="synthetic", method="binary", limit_per_class=8, embed_dim=16, depth=1,
                                num_heads=2, patch_size=8, batch_size=16, eval_batch_size=500, epochs=1,
                                out=str(tmp_path / tag), init_from=None, **kw)
        cfg = train.resolve_config(cfg)
        train_set, test_set = train.load_data(cfg)
        stage = methods.Stage("binary", "binary")  # the binary stage without its teacher
        path, _ = train.train_stage(cfg, stage, str(tmp_path / tag / "binary"), train_set, test_set)
        return train.load_model(path)

    default, meta = run("default")
    zero, _ = run("zero", grs_lambda=0.0)
    grs, grs_meta = run("grs", grs_lambda=0.05, grs_warmup_epochs=0.0)
    assert meta["gradient_hooks"] == [] and len(grs_meta["gradient_hooks"]) == 1
    for k in default.params:
        np.testing.assert_array_equal(default.params[k], zero.params[k])
    role = methods.binarized_weight_roles(default.quantizers)[0]
    assert not np.array_equal(default.params[role], grs.params[role])


# ------------------------------------------------------------------------------------------------
# the registry drives cost.py and train.py
# ------------------------------------------------------------------------------------------------

def test_cost_reads_the_registry(monkeypatch):
    assert cost.METHODS == tuple(methods.METHODS)
    for name, m in methods.METHODS.items():
        p = m.precision
        report = cost.model_cost("deit-tiny", name)
        row = next(r for r in report.rows if r.name == "blocks.0.mlp.fc1")
        expected = "FP32" if p.linear == (32, 32) else f"W{p.linear[0]}A{p.linear[1]}"
        assert row.precision == expected
        assert any(r.name == "head_dist" for r in report.rows) == p.distilled
    # a new method in the registry is costed without touching cost.py: binary with FP32 attention matmuls
    patterns = {**methods.BINARY_TABLE, **{f"blocks.*.attn.{t}": "fp" for t in ("q", "k", "attn", "v")}}
    monkeypatch.setitem(methods.TABLES, "binary_fp_attn", methods.QuantizerTable("binary_fp_attn", patterns))
    monkeypatch.setitem(methods.METHODS, "binary_fp_attn", methods.Method(
        "binary_fp_attn", (methods.Stage("binary_fp_attn", "binary_fp_attn"),)))
    report = cost.model_cost("deit-tiny", "binary_fp_attn")
    qk = next(r for r in report.rows if r.name == "blocks.0.attn.q@k")
    lin = next(r for r in report.rows if r.name == "blocks.0.mlp.fc1")
    assert qk.precision == "FP32" and lin.precision == "W1A1" and qk.bops == 0 and lin.bops > 0


def test_train_and_cost_compare_no_method_names():
    pattern = re.compile(r'"binaryvit"|"gsb"|"tervit"|"binary"|== "fp"')
    for module in ("train.py", "cost.py"):
        source = open(os.path.join(ROOT, "minibvit", module)).read()
        assert not pattern.findall(source), f"{module} compares method names: {pattern.findall(source)}"


# ------------------------------------------------------------------------------------------------
# one quantizer-input recorder
# ------------------------------------------------------------------------------------------------

def test_recorder_sees_the_quantizer_inputs_and_restores_the_model():
    cfg = tiny_cfg()
    model = ViT(cfg, quantizers=methods.build_quantizers(cfg, "binaryvit", dtype="float64"), dtype=np.float64)
    x = np.random.default_rng(2).standard_normal((2, 3, 16, 16))
    model.forward(x, training=True)
    reference, _ = model.forward(x, training=False)
    roles = ["blocks.0.attn.qkv.input", "blocks.0.attn.v"]
    seen = diagnostics.record_quantizer_inputs(model, roles, x)
    assert set(seen) == set(roles)
    for role in roles:
        q = model.quantizers[role]
        assert "forward" not in vars(q), "the recorder must restore the quantizer"
        t, out = seen[role]
        np.testing.assert_array_equal(q.forward(t, False)[0], out)
    qkv_in = seen["blocks.0.attn.qkv.input"][0]
    assert qkv_in.shape == (2, cfg.num_tokens, cfg.embed_dim)
    again, _ = model.forward(x, training=False)
    np.testing.assert_array_equal(reference, again)


def test_gsb_refined_alpha_gradient_is_gsb_s():
    """quant's alpha_grad="gsb" is gsb.refined_alpha_terms: dalpha = sum((sign x - 1[|q|<=1] q) g)/sqrt(N)."""
    rng = np.random.default_rng(3)
    x, g, alpha = rng.standard_normal(50), rng.standard_normal(50), np.array([0.7])
    out, cache = quant.elastic_binarize_forward(x, alpha, True, "gsb")
    _, dalpha = quant.elastic_binarize_backward(g, cache)
    q = x / 0.7
    expected = np.sum(gsb.refined_alpha_terms(x, q, np.abs(q) <= 1) * g) / np.sqrt(50)
    np.testing.assert_allclose(dalpha[0], expected, rtol=1e-13)
    np.testing.assert_allclose(dalpha[0], np.sum((np.where(x >= 0, 1.0, -1.0) - (np.abs(q) <= 1) * q) * g) / np.sqrt(50),
                               rtol=1e-13)
