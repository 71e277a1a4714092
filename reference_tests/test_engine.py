"""minibvit.engine: export of trained low-bit checkpoints and the bit-packed inference engine.

The engine's logits are compared with the training-time (simulated) forward ``ViT.forward(x,
training=False)`` of the same checkpoint: bit for bit (np.array_equal) for binary, binaryvit (every
ASM centre) and tervit, on odd sizes (K not a multiple of 64, head dim 24 and 64, batch 1 and 5),
exact zeros in the inputs, a distilled model, mean pooling, tanh GELU and no qkv bias. GSB's A_q V_q
is a sum of nine scaled integer products: the engine equals, bit for bit, the simulated forward with
that product computed on the integer levels (a reference written here), and the unmodified
simulated forward (a float32 BLAS product) to a tolerance (see docs/engine.md). Predictions are
compared on the whole synthetic test split. Models are random (a training forward initialises the
activation scales and ASM centres, random shifts make the thresholds non-trivial) and saved in the
format train.load_model reads.
"""
import dataclasses
import os

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from adapter import ViT, ViTConfig, checkpoint, data, engine, infer, kernels, methods, ops, quant, schemes

BASE = dict(image_size=16, patch_size=4, in_chans=3, embed_dim=72, depth=2, num_heads=3, num_classes=10)
WIDE_HEADS = dict(BASE, embed_dim=128, num_heads=2, mlp_ratio=2.0)        # head dim 64: whole-word paths


def make_checkpoint(path, scheme, config=BASE, center="mean", seed=0, initialise=True, **options):
    """A random model of `scheme` saved as a training checkpoint; returns (model, path)."""
    cfg = ViTConfig(**config)
    opts = schemes.SchemeOptions(asm_center=center, **options)
    model = ViT(cfg, schemes.build_quantizers(cfg, scheme, options=opts), seed=seed)
    rng = np.random.default_rng(seed)
    for name, value in model.params.items():
        if name.endswith("bias") or "norm" in name:
            value += rng.normal(0, 0.1, value.shape).astype(np.float32)
    if initialise:
        x = rng.standard_normal((6, cfg.in_chans, cfg.image_size, cfg.image_size)).astype(np.float32)
        model.forward(x, training=True, rng=rng)
    for name, value in model.parameters().items():
        if name.endswith("_quant.shift"):
            value += rng.normal(0, 0.05, value.shape).astype(np.float32)
        if name.endswith("attn_quant.bias"):
            value += rng.normal(0, 0.01, value.shape).astype(np.float32)
    meta = {"kind": "minibvit-train", "model_config": cfg.to_dict(), "scheme": scheme,
            "scheme_options": dataclasses.asdict(opts),
            "dataset": {"name": "synthetic"}, "train_config": {"data_dir": None, "image_size": cfg.image_size}}
    checkpoint.save_checkpoint(str(path), {f"model.{k}": v for k, v in model.state_dict().items()}, meta)
    return model, str(path)


def exported(tmp_path, scheme, **kwargs):
    model, ckpt = make_checkpoint(tmp_path / f"{scheme}.safetensors", scheme, **kwargs)
    report = engine.export(ckpt, tmp_path / f"{scheme}.packed.safetensors")
    return model, engine.PackedViT.load(report.path), report


def images(cfg, batch, seed=1):
    x = np.random.default_rng(seed).standard_normal((batch, cfg.in_chans, cfg.image_size, cfg.image_size))
    x = x.astype(np.float32)
    x[0, :, :4] = 0.0          # exact zeros
    return x


def assert_bit_exact(model, eng, x):
    expected, _ = model.forward(x, training=False)
    got = eng.forward(x)
    assert got.dtype == np.float32 and got.shape == expected.shape
    diff = np.abs(got - expected)
    assert np.array_equal(got, expected), (f"packed logits differ from the simulated forward on "
                                           f"{int((diff > 0).sum())} entries, max |diff| {diff.max():.3g}")


# ---------------------------------------------------------------------------------------------
# bit-exactness against the simulated forward

@pytest.mark.parametrize("scheme, center, config", [
    ("binary", "mean", BASE),
    ("binary", "mean", WIDE_HEADS),
    ("binaryvit", "mean", BASE),
    ("binaryvit", "median", WIDE_HEADS),
    ("binaryvit", "token", BASE),
    ("binaryvit", "token", WIDE_HEADS),
    ("binaryvit", "shift", BASE),
    ("binaryvit", "mean", dict(BASE, global_pool="mean", gelu_approximate="tanh", qkv_bias=False)),
    ("binary", "mean", dict(BASE, distilled=True)),
    ("tervit", "mean", BASE),
    ("tervit", "mean", dict(WIDE_HEADS, distilled=True)),
    ("tervit", "mean", dict(BASE, gelu_approximate="tanh")),
])
def test_packed_logits_equal_simulated_forward(tmp_path, scheme, center, config):
    model, eng, _ = exported(tmp_path, scheme, config=config, center=center)
    # every decision tabulated: the whole network runs in one parallel region (engine._binary_net)
    assert (eng.net is not None) == (scheme in ("binary", "binaryvit") and center != "token")
    for batch in (1, 5):
        assert_bit_exact(model, eng, images(model.cfg, batch))
    eng.chunk_images = 2                     # blocks run on chunks of images: the same bits
    assert_bit_exact(model, eng, images(model.cfg, 5, seed=2))


@pytest.mark.parametrize("scheme, center", [("binary", "mean"), ("binaryvit", "median")])
def test_float_fallback_paths_equal_simulated_forward(tmp_path, monkeypatch, scheme, center):
    """Without decision intervals (a table that is not one interval per column) and with a
    non-monotone exp table, the engine takes its float paths: the same bits."""
    monkeypatch.setattr(engine.fused, "decision_intervals", lambda table: None)
    monkeypatch.setattr(engine.fused, "table_is_monotone", lambda table: False)
    model, eng, _ = exported(tmp_path, scheme, config=WIDE_HEADS, center=center)
    assert all(blk.get("fc1_intervals") is None and not blk["exp_monotone"] for blk in eng.blocks)
    assert eng.net is None
    assert_bit_exact(model, eng, images(model.cfg, 5))


def test_non_monotone_softmax_in_whole_network_kernel(tmp_path, monkeypatch):
    """With decision intervals but a non-monotone exp table, _binary_net evaluates each attention
    probability instead of thresholding the scores: the same bits."""
    monkeypatch.setattr(engine.fused, "table_is_monotone", lambda table: False)
    model, eng, _ = exported(tmp_path, "binaryvit", config=WIDE_HEADS, center="mean")
    assert eng.net is not None and not eng.net.exp_monotone.any()
    assert_bit_exact(model, eng, images(model.cfg, 5))


@pytest.mark.parametrize("options, config", [
    (dict(gsb_max_over="tensor"), BASE),
    (dict(gsb_max_over="row", gsb_mode="principled"), BASE),
    (dict(gsb_max_over="tensor"), dict(WIDE_HEADS, image_size=40)),   # 102 tokens: two words, one partial
])
def test_gsb_bit_exact(tmp_path, options, config):
    """GSB's A_q V_q is a sum of nine scaled integer products in both the simulated forward
    (ops._basis_matmul) and the engine (gsb_combine), combined in the same order: the same bits."""
    model, eng, _ = exported(tmp_path, "gsb", config=dict(config, distilled=True), **options)
    assert_bit_exact(model, eng, images(model.cfg, 5))


def test_predictions_identical_on_synthetic_test_split(tmp_path):
    test_set = data.load_dataset("synthetic", "test")
    config = dict(BASE, image_size=32, patch_size=8)
    for scheme, center in (("binaryvit", "mean"), ("tervit", "mean")):
        model, eng, _ = exported(tmp_path, scheme, config=config, center=center)
        batches = data.iterate_batches(test_set, 250, seed=0, epoch=0, train=False, augment=False)
        for x, _ in batches:
            expected, _ = model.forward(x, training=False)
            got = eng.forward(x)
            assert np.array_equal(got.argmax(axis=1), expected.argmax(axis=1)), scheme
            assert np.array_equal(got, expected), scheme


# ---------------------------------------------------------------------------------------------
# the export itself

def test_export_stores_packed_weights_thresholds_and_size(tmp_path):
    model, eng, report = exported(tmp_path, "binaryvit", config=BASE, center="median")
    tensors, meta = checkpoint.load_checkpoint(report.path)
    assert meta["kind"] == "minibvit-packed" and meta["scheme"] == "binaryvit"
    assert ViTConfig.from_dict(meta["model_config"]) == model.cfg
    assert meta["scheme_options"]["asm_center"] == "median"
    assert report.file_bytes == os.path.getsize(report.path)
    assert report.fp32_bytes == 4 * sum(v.size for v in model.params.values())
    assert report.ratio == pytest.approx(report.fp32_bytes / report.file_bytes)
    assert sum(report.bytes_by_kind.values()) == report.file_bytes
    name = "blocks.1.mlp.fc2"
    w = model.params[f"{name}.weight"]
    centred = w - w.mean(axis=1, keepdims=True)
    bits = tensors[f"{name}.weight_bits"]
    assert bits.dtype == np.uint64 and bits.shape == (-(-w.shape[1] // 64), w.shape[0])
    signs = kernels.unpack_signs(np.ascontiguousarray(bits.T), w.shape[1])
    np.testing.assert_array_equal(signs, np.where(centred >= 0, 1, -1))
    np.testing.assert_array_equal(tensors[f"{name}.weight_scale"], np.abs(centred).mean(axis=1))
    asm = model.quantizers[f"{name}.input"]
    np.testing.assert_array_equal(tensors[f"{name}.input_threshold"],
                                  asm.buffers["running_center"] + asm.params["shift"])
    np.testing.assert_array_equal(tensors[f"{name}.input_scale"], np.maximum(asm.inner.params["alpha"], 1e-5))
    codes = tensors["head.weight_codes"]
    assert codes.dtype == np.int8
    np.testing.assert_array_equal(codes, quant.minmax_codes(model.params["head.weight"], 8, True, 0)[0])


def test_export_ternary_planes(tmp_path):
    model, _, report = exported(tmp_path, "tervit")
    tensors, _ = checkpoint.load_checkpoint(report.path)
    name = "blocks.0.attn.qkv"
    codes, alpha, _ = quant.ternary_codes(model.params[f"{name}.weight"], per_channel=True)
    planes = tensors[f"{name}.weight_nonzero"], tensors[f"{name}.weight_sign"]
    np.testing.assert_array_equal(kernels.unpack_ternary(*planes, codes.shape[1]), codes)
    np.testing.assert_array_equal(tensors[f"{name}.weight_scale"], alpha)


def test_token_centre_stores_shift_not_threshold(tmp_path):
    model, _, report = exported(tmp_path, "binaryvit", center="token")
    tensors, _ = checkpoint.load_checkpoint(report.path)
    assert "blocks.0.attn.qkv.input_threshold" not in tensors
    np.testing.assert_array_equal(tensors["blocks.0.attn.qkv.input_shift"],
                                  model.quantizers["blocks.0.attn.qkv.input"].params["shift"])


@pytest.mark.parametrize("scheme, message", [("fp", "full-precision"), ("gsb_stage1", "intermediate"),
                                             ("tervit_w8a8", "intermediate")])
def test_export_refuses_methods_without_packed_form(tmp_path, scheme, message):
    _, ckpt = make_checkpoint(tmp_path / "m.safetensors", scheme)
    with pytest.raises(ValueError, match=message):
        engine.export(ckpt, tmp_path / "out.safetensors")
    assert not (tmp_path / "out.safetensors").exists()


def test_export_refuses_uninitialised_scales(tmp_path):
    _, ckpt = make_checkpoint(tmp_path / "m.safetensors", "binary", initialise=False)
    with pytest.raises(ValueError, match="uninitialised"):
        engine.export(ckpt, tmp_path / "out.safetensors")


def test_export_and_load_reject_corrupt_and_foreign_files(tmp_path):
    _, ckpt = make_checkpoint(tmp_path / "m.safetensors", "binary")
    raw = open(ckpt, "rb").read()
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(raw[: len(raw) // 2])
    from safetensors.numpy import save_file
    foreign = tmp_path / "foreign.safetensors"
    save_file({"w": np.zeros(3, np.float32)}, str(foreign))
    for bad in (truncated, foreign, tmp_path / "missing.safetensors"):
        with pytest.raises(checkpoint.CheckpointError):
            engine.export(str(bad), tmp_path / "out.safetensors")
        with pytest.raises(checkpoint.CheckpointError):
            engine.PackedViT.load(str(bad))
    with pytest.raises(checkpoint.CheckpointError, match="training checkpoint"):
        engine.PackedViT.load(ckpt)
    report = engine.export(ckpt, tmp_path / "packed.safetensors")
    tensors, meta = checkpoint.load_checkpoint(report.path)
    del tensors["blocks.1.mlp.fc1.weight_bits"]
    checkpoint.save_checkpoint(str(tmp_path / "damaged.safetensors"), tensors, meta)
    with pytest.raises(checkpoint.CheckpointError, match="blocks.1.mlp.fc1.weight_bits"):
        engine.PackedViT.load(str(tmp_path / "damaged.safetensors"))
    checkpoint.save_checkpoint(str(tmp_path / "future.safetensors"), tensors, {**meta, "packed_version": 99})
    with pytest.raises(ValueError, match="version"):
        engine.PackedViT.load(str(tmp_path / "future.safetensors"))


def test_forward_rejects_wrong_image_shape(tmp_path):
    _, eng, _ = exported(tmp_path, "binary")
    with pytest.raises(ValueError, match="expected images of shape"):
        eng.forward(np.zeros((2, 3, 8, 8), np.float32))


# ---------------------------------------------------------------------------------------------
# the engine's exact building blocks

@settings(max_examples=20, deadline=None)
@given(st.integers(0, 2 ** 32 - 1))
def test_transpose_bits64(seed):
    words = np.random.default_rng(seed).integers(0, 2 ** 63, 64, dtype=np.uint64) * np.uint64(2)
    words[::7] |= np.uint64(1)
    out = words.copy()
    engine.fused.transpose_bits64(out)
    bits = np.unpackbits(words.view(np.uint8), bitorder="little").reshape(64, 64)
    expected = np.ascontiguousarray(np.packbits(bits.T, axis=1, bitorder="little")).view(np.uint64).reshape(64)
    np.testing.assert_array_equal(out, expected)


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 130), st.integers(0, 2 ** 32 - 1), st.booleans())
def test_layernorm_and_sign_pack_bit_exact(n, seed, zeros):
    """The fused residual + LayerNorm + sign packing against ops.layernorm_forward and pack_signs,
    over row counts that exercise the 4-row groups and their remainder."""
    rng = np.random.default_rng(seed)
    rows = int(rng.integers(1, 11))
    x = rng.standard_normal((rows, n)).astype(np.float32)
    add = rng.standard_normal((rows, n)).astype(np.float32)
    if zeros:
        x[:, ::3] = 0.0
        add[:, ::3] = 0.0
    gamma, beta = rng.standard_normal(n).astype(np.float32), rng.standard_normal(n).astype(np.float32)
    threshold = (rng.standard_normal(n) * 0.1).astype(np.float32)
    threshold[::4] = 0.0
    expected_x = x + add
    h, _ = ops.layernorm_forward(expected_x, gamma, beta, 1e-6)
    expected = kernels.pack_signs(np.where(h - threshold >= 0, 1.0, -1.0).astype(np.float32))
    bits = np.empty_like(expected)
    dummy_i = np.zeros((1, 1), np.int32)
    engine.fused.residual_norm_pack(x, add, dummy_i, dummy_i[0], gamma, gamma, 1, gamma, beta, np.float32(1e-6),
                               threshold, bits, np.zeros((1, 1), np.float32), 1)
    np.testing.assert_array_equal(x, expected_x)
    np.testing.assert_array_equal(bits, expected)


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 130), st.integers(0, 2 ** 32 - 1), st.sampled_from([1, 2, 3, 64]))
def test_decision_intervals_reproduce_tables(n, seed, k):
    rng = np.random.default_rng(seed)
    lo, hi = np.sort(rng.integers(-k - 1, k + 2, (2, n)), axis=0)
    values = np.arange(-k, k + 1)[None, :]
    invert = rng.integers(0, 2, n).astype(bool)
    table = ((values >= lo[:, None]) & (values <= hi[:, None])) != invert[:, None]
    intervals = engine.decision_intervals(table)
    assert intervals is not None
    acc = rng.integers(-k, k + 1, (7, n)).astype(np.int32)
    bits = np.empty((7, -(-n // 64)), np.uint64)
    engine.fused.pack_interval_rows(acc, *engine.fused.interval_operands(intervals), bits)
    np.testing.assert_array_equal(bits, kernels.pack_bits(table[np.arange(n), acc + k]))
    if 2 * k + 1 >= 5:
        table[0] = False
        table[0, [0, 2, 4]] = True           # neither the ones nor the zeros form one run
        assert engine.decision_intervals(table) is None


def test_softmax_bits_equal_ops_softmax_and_binarizer():
    """Attention bits from the exp table and per-row thresholds equal ops' softmax followed by the
    unsigned elastic binarizer, including rows whose probabilities sit exactly at the threshold."""
    rng = np.random.default_rng(0)
    d, n = 64, 77
    scores = (rng.integers(-d // 2, d // 2 + 1, (300, n)) * 2).astype(np.int32)
    scores[:5] = scores[:5, :1]               # uniform rows: p = 1/n everywhere
    s_qk, inv_sqrt_d = np.float32(0.37), np.float32(1 / 8)
    table = engine.exp_table(d, s_qk, inv_sqrt_d)
    assert engine.table_is_monotone(table)
    x = scores.astype(np.float32)
    x *= s_qk
    x *= inv_sqrt_d
    p, _ = ops.softmax_forward(x)
    probs = np.empty_like(p)
    engine.fused.score_softmax(scores, table, False, probs, np.float32(1), np.empty((0, 1), np.uint64))
    np.testing.assert_array_equal(probs, p)
    for alpha in (np.float32(2 / n), np.float32(0.05), np.float32(0.5)):
        levels = np.clip(np.round(p / alpha), 0, 1)
        bits = np.empty((len(scores), -(-n // 64)), np.uint64)
        engine.fused.score_softmax(scores, table, True, np.empty((0, n), np.float32), alpha, bits)
        np.testing.assert_array_equal(bits, kernels.pack_bits(levels))


# ---------------------------------------------------------------------------------------------
# command line

def test_cli_export_and_evaluate(tmp_path, capsys):
    _, ckpt = make_checkpoint(tmp_path / "m.safetensors", "binaryvit", config=dict(BASE, image_size=32, patch_size=8))
    out = tmp_path / "m.packed.safetensors"
    assert infer.main(["export", "--checkpoint", ckpt, "--out", str(out)]) == 0
    assert "ratio" in capsys.readouterr().out
    assert infer.main(["--packed", str(out), "--limit", "40", "--batch-size", "16", "--compare", ckpt]) == 0
    printed = capsys.readouterr().out
    assert "synthetic test accuracy" in printed and "bit-identical on 40/40" in printed
    _, fp = make_checkpoint(tmp_path / "fp.safetensors", "fp")
    assert infer.main(["export", "--checkpoint", fp, "--out", str(tmp_path / "fp.packed.safetensors")]) == 2
    assert "full-precision" in capsys.readouterr().err
    assert infer.main(["--packed", ckpt]) == 2
