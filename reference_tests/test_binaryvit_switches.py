"""BinaryViT's switches do what they claim: --asm off is the binary baseline bit for bit and --asm on
adds exactly BinaryViT's ASM; every GRS schedule, per-layer strength and flip mask matches its closed
form on tiny tensors; ASM's placements wrap the roles they name; the learned ASM scale leaves the
forward unchanged and has the stated pseudo-gradients (checked by finite differences of the
straight-through surrogate)."""
import json
import math
import os
import types

import numpy as np
import pytest

from minibvit import binaryvit, checkpoint, methods, quant, train
from minibvit.model import ViTConfig

pytestmark = pytest.mark.impl_specific  # tests minibvit itself (conftest.py: MINIBVIT_ONLY_MODULES)

TINY = dict(image_size=16, patch_size=8, in_chans=3, num_classes=4, embed_dim=16, depth=1, num_heads=2, mlp_ratio=2.0)
RUN = dict(dataset="synthetic", limit_per_class=8, embed_dim=16, depth=1, num_heads=2, patch_size=8, batch_size=16,
           eval_batch_size=500, epochs=2, teacher_epochs=1, log_every=1)


# ------------------------------------------------------------------------------------------------
# --asm on / off
# ------------------------------------------------------------------------------------------------

def _run(tmp_path, tag, **kw):
    """Train the method's recipe on a tiny synthetic task; (last checkpoint tensors, logged step losses)."""
    out = str(tmp_path / tag)
    results = train.run(train.TrainConfig(out=out, **RUN, **kw))
    (stage,) = [s for s in results if s != "teacher"]  # the first (full-precision) stage
    tensors, _ = checkpoint.load_checkpoint(os.path.join(out, stage, "last.safetensors"))
    losses = [json.loads(line)["loss"] for line in open(os.path.join(out, stage, "log.jsonl")) if '"loss"' in line]
    return tensors, losses


def _assert_same_run(a, b):
    assert sorted(a[0]) == sorted(b[0])
    for k in a[0]:
        np.testing.assert_array_equal(a[0][k], b[0][k], err_msg=k)
    assert a[1] == b[1] and len(a[1]) > 1


def test_asm_off_is_the_binary_baseline_bit_for_bit(tmp_path):
    binary = _run(tmp_path, "binary", method="binary")
    _assert_same_run(binary, _run(tmp_path, "bvit-off", method="binaryvit", asm="off", grs_lambda=0.0))
    with_asm = _run(tmp_path, "binary-on", method="binary", asm="on")
    _assert_same_run(with_asm, _run(tmp_path, "bvit-nogrs", method="binaryvit", grs_lambda=0.0))
    assert with_asm[1] != binary[1]
    assert any(k.endswith(".shift") for k in with_asm[0]) and not any(k.endswith(".shift") for k in binary[0])


def _asm_roles(table, **options):
    cfg = ViTConfig(**TINY)
    qs = methods.build_quantizers(cfg, table, options=methods.QuantizerOptions(**options), dtype="float64")
    return {role for role, q in qs.items() if isinstance(q, binaryvit.ASM)}, qs


def test_asm_switch_and_placements_wrap_the_roles_they_name():
    b = "blocks.0."
    table_roles, _ = _asm_roles("binaryvit")
    assert table_roles == {b + r for r in ("attn.qkv.input", "attn.q", "attn.k", "attn.v", "attn.proj.input",
                                           "mlp.fc1.input", "mlp.fc2.input")}
    assert _asm_roles("binary", asm="on")[0] == table_roles
    assert _asm_roles("binary")[0] == set() == _asm_roles("binaryvit", asm="off")[0]
    off = _asm_roles("binaryvit", asm="off")[1]
    assert {r: repr(q) for r, q in off.items()} == {r: repr(q) for r, q in _asm_roles("binary")[1].items()}
    linear = {b + r for r in ("attn.qkv.input", "attn.proj.input", "mlp.fc1.input", "mlp.fc2.input")}
    for table in ("binary", "binaryvit"):
        assert _asm_roles(table, asm="on", asm_where="linear")[0] == linear
        assert _asm_roles(table, asm="on", asm_where="attention")[0] == {b + "attn.q", b + "attn.k", b + "attn.v"}
        assert _asm_roles(table, asm="on", asm_where="signed")[0] == table_roles - {b + "mlp.fc2.input"}
    assert _asm_roles("binaryvit", asm_where="linear")[0] == linear  # the table's ASM, restricted
    gsb_roles, _ = _asm_roles("gsb", asm="on")
    assert b + "attn.q" in gsb_roles and b + "attn.v" not in gsb_roles  # GSB's values keep their quantizer
    scaled = _asm_roles("binary", asm="on", asm_scale="on")[1]
    assert {r for r, q in scaled.items() if isinstance(q, binaryvit.ASM) and q.scale} == table_roles - {
        b + "mlp.fc2.input"}  # the scale only in front of signed binarizers


def test_asm_options_are_refused_while_asm_is_off():
    def resolve(**kw):
        return train.resolve_config(train.TrainConfig(dataset="synthetic", **kw))

    with pytest.raises(ValueError, match="--asm-center do\\(es\\) not apply to --method binary with ASM off"):
        resolve(method="binary", asm_center="median")
    with pytest.raises(ValueError, match="--asm-where, --asm-scale do\\(es\\) not apply .* add --asm on"):
        resolve(method="binaryvit", asm="off", asm_where="linear", asm_scale="on")
    cfg = resolve(method="binary", asm="on", asm_center="median", asm_scale="on")
    assert train.quantizer_options(cfg) == methods.QuantizerOptions(asm="on", asm_center="median", asm_scale="on")
    with pytest.raises(ValueError, match="--asm do\\(es\\) not apply to --method tervit"):
        resolve(method="tervit", asm="on")
    with pytest.raises(ValueError, match="--asm-center must be one of .*'shift'"):
        resolve(method="binaryvit", asm_center="none")
    with pytest.raises(ValueError, match="renamed 'shift'.*--asm off"):
        binaryvit.ASM(quant.ElasticBinarizer(), 2, center="none")
    with pytest.raises(ValueError, match="renamed 'shift'"):
        methods.QuantizerOptions(asm_center="none")
    with pytest.raises(ValueError, match="--asm must be one of"):
        resolve(method="binary", asm="yes")
    with pytest.raises(ValueError, match="--grs-start-epoch must be a number of epochs >= 0"):
        resolve(method="binary", grs_start_epoch=-1.0)
    args = train._parser().parse_args(["--method", "binary", "--asm", "on", "--asm-where", "linear",
                                       "--grs-schedule", "cosine_decay", "--grs-flip-window", "0.5"])
    assert (args.asm, args.asm_where, args.grs_schedule, args.grs_flip_window) == ("on", "linear", "cosine_decay", 0.5)


# ------------------------------------------------------------------------------------------------
# the learned ASM scale
# ------------------------------------------------------------------------------------------------

def _surrogate(x, shift, scale, alpha, g, center):
    """sum(g * alpha clip(z / alpha, -1, 1)), z = scale (x - c - shift): the function whose gradient
    the signed elastic binarizer's STE uses for x, the shift and the scale (alpha held)."""
    c = x.mean(axis=-1, keepdims=True) if center == "token" else 0.0
    z = scale * (x - c - shift)
    return float(np.sum(g * alpha * np.clip(z / alpha, -1, 1)))


@pytest.mark.parametrize("center", ["shift", "token", "mean"])
def test_asm_scale_keeps_the_forward_and_has_the_stated_gradients(center):
    rng = np.random.default_rng(3)
    C = 5
    asm = binaryvit.ASM(quant.ElasticBinarizer(dtype=np.float64), C, center=center, dtype=np.float64, scale=True)
    plain = binaryvit.ASM(quant.ElasticBinarizer(dtype=np.float64), C, center=center, dtype=np.float64)
    x0 = rng.normal(size=(3, 4, C))
    for q in (asm, plain):
        q.forward(x0, training=True)  # sets alpha (and the running centre)
    asm.params["shift"][...] = plain.params["shift"][...] = rng.normal(size=C) * 0.1
    asm.params["scale"][...] = [0.5, 0.8, 1.0, 1.5, 3.0]
    asm.params["alpha"][...] = plain.params["alpha"][...] = 1.2
    x, g = rng.normal(size=(3, 4, C)), rng.normal(size=(3, 4, C))
    out, cache = asm.forward(x, training=False)
    out_plain, cache_plain = plain.forward(x, training=False)
    np.testing.assert_array_equal(out, out_plain)  # sign(s y) = sign(y)
    assert center == "token" or np.array_equal(binaryvit.asm_fold_threshold(asm), binaryvit.asm_fold_threshold(plain))
    dx, grads = asm.backward(g, cache)
    # the closed forms: z = s y, dz = 1[|z| <= alpha] g, dy = s dz, ds = sum dz y, dr = -sum dy
    c = x.mean(-1, keepdims=True) if center == "token" else (asm.buffers["running_center"] if center == "mean" else 0)
    y = x - (c + asm.params["shift"])
    z = asm.params["scale"] * y
    dz = (np.abs(z) <= 1.2) * g
    np.testing.assert_allclose(grads["scale"], (dz * y).reshape(-1, C).sum(0), rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(grads["shift"], -(asm.params["scale"] * dz).reshape(-1, C).sum(0), rtol=1e-12)
    np.testing.assert_allclose(grads["alpha"], quant.ElasticBinarizer(dtype=np.float64).backward(
        g, quant.elastic_binarize_forward(z, asm.params["alpha"], True)[1])[1]["alpha"], rtol=1e-12)
    # finite differences of the surrogate (no element within 1e-4 of a window edge)
    assert np.abs(np.abs(z) - 1.2).min() > 1e-4
    cen = center if center == "token" else None
    shift0, scale0, eps = asm.params["shift"].copy(), asm.params["scale"].copy(), 1e-6
    offset = 0 if center != "mean" else asm.buffers["running_center"]

    def loss(xx=x, r=shift0, s=scale0):
        return _surrogate(xx - offset, r, s, 1.2, g, cen)

    for arg, base, grad in (("r", shift0, grads["shift"]), ("s", scale0, grads["scale"])):
        fd = np.array([(loss(**{arg: base + eps * e}) - loss(**{arg: base - eps * e})) / (2 * eps) for e in np.eye(C)])
        np.testing.assert_allclose(grad, fd, rtol=1e-6, atol=1e-8, err_msg=arg)
    fd_x = np.zeros_like(x)
    for i in np.ndindex(x.shape):
        e = np.zeros_like(x)
        e[i] = eps
        fd_x[i] = (loss(xx=x + e) - loss(xx=x - e)) / (2 * eps)
    np.testing.assert_allclose(dx, fd_x, rtol=1e-6, atol=1e-8)


def test_asm_scale_floor_and_refusals():
    asm = binaryvit.ASM(quant.ElasticBinarizer(dtype=np.float64), 2, center="shift", dtype=np.float64, scale=True)
    asm.params["scale"][...] = [-1.0, 2.0]
    x = np.array([[0.5, -0.5], [1.0, 0.25]])
    out, cache = asm.forward(x, training=True)
    assert np.all(np.sign(out) == np.where(x >= 0, 1, -1))  # a floored scale never flips a sign
    _, grads = asm.backward(np.ones_like(x), cache)
    assert grads["scale"][0] == 0 and grads["scale"][1] != 0
    with pytest.raises(ValueError, match="signed inner binarizer"):
        binaryvit.ASM(quant.ElasticBinarizer(signed=False), 2, scale=True)
    assert "scale=True" in repr(asm)


# ------------------------------------------------------------------------------------------------
# GRS: schedules, per-layer strength, flip mask
# ------------------------------------------------------------------------------------------------

def test_grs_lambda_schedules_closed_form():
    lam = 0.2
    assert binaryvit.grs_lambda(9, lam, 0, start_step=10) == 0.0
    assert binaryvit.grs_lambda(10, lam, 0, start_step=10) == pytest.approx(lam)
    assert binaryvit.grs_lambda(15, lam, 10, start_step=10) == pytest.approx(lam / 2)  # warm-up from the onset
    for t, u in ((10, 0.0), (20, 0.25), (30, 0.5), (50, 1.0), (70, 1.0)):
        decay = binaryvit.grs_lambda(t, lam, 0, start_step=10, total_steps=50, schedule="cosine_decay")
        rise = binaryvit.grs_lambda(t, lam, 0, start_step=10, total_steps=50, schedule="cosine_increase")
        assert decay == pytest.approx(lam * (1 + math.cos(math.pi * u)) / 2, abs=1e-15)
        assert rise == pytest.approx(lam * (1 - math.cos(math.pi * u)) / 2, abs=1e-15)
    assert binaryvit.grs_lambda(5, lam, 10, total_steps=40, schedule="cosine_decay") == pytest.approx(
        lam * 0.5 * (1 + math.cos(math.pi * 5 / 40)) / 2)  # warm-up times the annealing
    with pytest.raises(ValueError, match="total steps"):
        binaryvit.grs_lambda(0, lam, 0, schedule="cosine_decay")
    with pytest.raises(ValueError, match="schedule"):
        binaryvit.grs_lambda(0, lam, 0, schedule="step")


def _fake_model(weights, spec):
    return types.SimpleNamespace(params=dict(weights), grads={k: np.zeros_like(v) for k, v in weights.items()},
                                 quantizers={k: quant.make_quantizer(spec) for k in weights})


def _l2(w, lam):
    alpha = np.abs(w).mean(axis=1, keepdims=True)
    return lam * (w - alpha * np.where(w >= 0, 1.0, -1.0))


@pytest.mark.parametrize("spec", ["w_binary", "w_xnor"])
def test_grs_hook_onset_and_layer_norms_closed_form(spec):
    rng = np.random.default_rng(0)
    weights = {"a": rng.normal(size=(2, 3)), "b": 0.1 * rng.normal(size=(2, 12))}
    centred = spec == "w_binary"
    wc = {k: w - w.mean(1, keepdims=True) if centred else w for k, w in weights.items()}

    def pull(g):
        return g - g.mean(1, keepdims=True) if centred else g

    hook = binaryvit.GRSHook(["a", "b"], 0.1, start_step=4)
    model = _fake_model(weights, spec)
    hook(model, 3)
    assert all(not g.any() for g in model.grads.values())  # before the onset: no GRS at all
    hook(model, 4)
    for k in weights:
        np.testing.assert_allclose(model.grads[k], pull(_l2(wc[k], 0.1)), rtol=1e-13, atol=1e-16)
    inv = {k: 1 / np.abs(w).mean() for k, w in wc.items()}
    expected = {"scale": {k: v / np.mean(list(inv.values())) for k, v in inv.items()},
                "fan_in": {"a": 2 / 3, "b": 4 / 3}}  # sqrt(3), sqrt(12) = 2 sqrt(3), over their mean
    for norm, factors in expected.items():
        assert binaryvit.grs_layer_factors([wc["a"], wc["b"]], norm) == pytest.approx([factors["a"], factors["b"]])
        model = _fake_model(weights, spec)
        binaryvit.GRSHook(["a", "b"], 0.1, layer_norm=norm)(model, 0)
        for k in weights:
            np.testing.assert_allclose(model.grads[k], pull(_l2(wc[k], 0.1 * factors[k])), rtol=1e-12, atol=1e-16)


def test_grs_flip_window_regularizes_only_recent_flips():
    w = np.array([[0.5, -0.2, 0.1, -0.4], [0.3, 0.2, -0.1, -0.6]])
    model = _fake_model({"w": w}, "w_xnor")  # not centred: the latent is W itself
    hook = binaryvit.GRSHook(["w"], 0.1, flip_window=3)
    hook(model, 0)
    assert not model.grads["w"].any()  # no history yet: nothing has flipped
    model.params["w"] = w2 = w * np.array([[1, -1, 1, 1], [1, 1, 1, -1]])  # two signs flip
    hook(model, 1)
    mask = np.array([[0, 1, 0, 0], [0, 0, 0, 1]])
    np.testing.assert_allclose(model.grads["w"], mask * _l2(w2, 0.1), rtol=1e-13)
    model.grads["w"][...] = 0
    hook(model, 3)  # 2 steps after the flip: still in the window
    np.testing.assert_allclose(model.grads["w"], mask * _l2(w2, 0.1), rtol=1e-13)
    model.grads["w"][...] = 0
    hook(model, 4)  # 3 steps after: out of the window
    assert not model.grads["w"].any()
    with pytest.raises(ValueError, match="flip_window"):
        binaryvit.GRSHook(["w"], 0.1, flip_window=-1)


def test_grs_options_reach_the_hook():
    cfg = train.resolve_config(train.TrainConfig(
        dataset="synthetic", method="binary", grs_lambda=0.03, grs_start_epoch=1.5, grs_warmup_epochs=0.5,
        grs_schedule="cosine_increase", grs_layer_norm="fan_in", grs_flip_window=0.25, epochs=3))
    quantizers = methods.build_quantizers(ViTConfig(**TINY), "binary", dtype="float64")
    (hook,) = methods.gradient_hooks(methods.METHODS["binary"].final, quantizers, **methods.grs_settings(cfg, 20, 3))
    assert (hook.lam, hook.start_step, hook.warmup_steps, hook.total_steps, hook.schedule, hook.layer_norm,
            hook.flip_window) == (0.03, 30, 10, 60, "cosine_increase", "fan_in", 5)
    default = train.resolve_config(train.TrainConfig(dataset="synthetic", method="binaryvit", epochs=3))
    (hook,) = methods.gradient_hooks(methods.METHODS["binaryvit"].final, quantizers,
                                     **methods.grs_settings(default, 20, 3))
    assert (hook.start_step, hook.schedule, hook.layer_norm, hook.flip_window) == (
        round(binaryvit.GRS_DEFAULT_START_EPOCH * 20), binaryvit.GRS_DEFAULT_SCHEDULE,
        binaryvit.GRS_DEFAULT_LAYER_NORM, round(binaryvit.GRS_DEFAULT_FLIP_WINDOW * 20))
