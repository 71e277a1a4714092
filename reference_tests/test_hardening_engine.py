"""Issue 14, phase 2, engine side: the packed format's one tensor table, the loader's checks, the
kernels' zero-tail contract and the packers' dtypes (beyond test_hardening_phase2.py).

Models are random and saved as training checkpoints, as in test_engine.py, then exported.
"""
import dataclasses

import numpy as np
import pytest

from minibvit import checkpoint, engine, kernels, methods
from minibvit.model import ViT, ViTConfig

pytestmark = pytest.mark.impl_specific  # tests minibvit itself (conftest.py: MINIBVIT_ONLY_MODULES)

CONFIG = dict(image_size=16, patch_size=4, in_chans=3, embed_dim=72, depth=1, num_heads=3, num_classes=10)


def _checkpoint(tmp_path, scheme, center="mean", config=CONFIG):
    cfg = ViTConfig(**config)
    options = methods.QuantizerOptions(asm_center=center)
    model = ViT(cfg, methods.build_quantizers(cfg, scheme, options=options), seed=0)
    rng = np.random.default_rng(0)
    model.forward(rng.standard_normal((4, 3, 16, 16)).astype(np.float32), training=True, rng=rng)
    meta = {"kind": "minibvit-train", "model_config": cfg.to_dict(), "scheme": scheme,
            "scheme_options": dataclasses.asdict(options), "dataset": {"name": "synthetic"},
            "train_config": {"data_dir": None, "image_size": 16}}
    path = str(tmp_path / f"{scheme}-{center}.safetensors")
    checkpoint.save_checkpoint(path, {f"model.{k}": v for k, v in model.state_dict().items()}, meta)
    return cfg, options, path


def _exported(tmp_path, scheme, **kwargs):
    cfg, options, path = _checkpoint(tmp_path, scheme, **kwargs)
    report = engine.export(path, str(tmp_path / f"{scheme}.packed.safetensors"))
    return cfg, options, report.path


def _resaved(tmp_path, packed, edit_tensors=None, edit_metadata=None):
    tensors, meta = checkpoint.load_checkpoint(packed)
    if edit_tensors:
        edit_tensors(tensors)
    if edit_metadata:
        edit_metadata(meta)
    path = str(tmp_path / "edited.safetensors")
    checkpoint.save_checkpoint(path, tensors, meta)
    return path


# ---------------------------------------------------------------------------------------------
# the format table


@pytest.mark.parametrize("scheme, center, config", [
    ("binary", "mean", CONFIG), ("binaryvit", "mean", CONFIG), ("binaryvit", "token", CONFIG),
    ("gsb", "mean", dict(CONFIG, distilled=True)), ("tervit", "mean", dict(CONFIG, qkv_bias=False)),
])
def test_export_writes_exactly_the_format_table(tmp_path, scheme, center, config):
    cfg, options, packed = _exported(tmp_path, scheme, center=center, config=config)
    tensors, _ = checkpoint.load_checkpoint(packed)
    specs = engine.tensor_specs(cfg, scheme, options)
    assert sorted(tensors) == sorted(specs)
    for name, spec in specs.items():
        assert (tensors[name].dtype, tensors[name].shape) == (spec.dtype, spec.shape), name
        assert spec.dtype in (np.uint64, np.int8, np.float32), name
        assert (spec.dtype == np.uint64) == (spec.packed_k > 0), name
    assert engine.format_problems(specs, tensors) == []
    if scheme == "binaryvit":
        token = "blocks.0.attn.qkv.input_shift" in specs
        assert token == (center == "token") and ("blocks.0.attn.qkv.input_threshold" in specs) != token


def test_every_tensor_of_the_wrong_dtype_or_shape_is_refused(tmp_path):
    """Each tensor in turn retyped (same bytes, another dtype of its size) or given one element less."""
    cfg, options, packed = _exported(tmp_path, "binaryvit")
    tensors, _ = checkpoint.load_checkpoint(packed)
    specs = engine.tensor_specs(cfg, "binaryvit", options)
    other = {np.dtype(np.uint64): np.float64, np.dtype(np.int8): np.uint8, np.dtype(np.float32): np.int32}
    for name in specs:
        for bad in (tensors[name].view(other[tensors[name].dtype]), tensors[name].reshape(-1)[1:]):
            problems = engine.format_problems(specs, {**tensors, name: bad})
            assert len(problems) == 1 and problems[0].startswith(f"{name} is "), problems
            with pytest.raises(checkpoint.CheckpointError, match=name):
                engine.check_tensors(cfg, "binaryvit", options, {**tensors, name: bad})


def test_missing_and_unexpected_tensors_are_refused(tmp_path):
    _, _, packed = _exported(tmp_path, "binaryvit")

    def edit(t):
        del t["blocks.0.attn.q_threshold"]
        t["blocks.0.attn.q_shift"] = np.zeros(24, np.float32)   # the 'token' form, in a 'mean' model

    path = _resaved(tmp_path, packed, edit_tensors=edit)
    with pytest.raises(checkpoint.CheckpointError) as error:
        engine.PackedViT.load(path)
    message = str(error.value)
    assert path in message and "missing: blocks.0.attn.q_threshold" in message
    assert "unexpected: blocks.0.attn.q_shift" in message and "export it again" in message


@pytest.mark.parametrize("edit, expected", [
    (lambda m: m["model_config"].pop("image_size"), "model_config"),
    (lambda m: m.update(model_config=[1, 2]), "model_config"),
    (lambda m: m["model_config"].update(depth=0), "model_config"),
    (lambda m: m.update(scheme="tervit_w8a8"), "tervit_w8a8"),
    (lambda m: m.update(scheme_options="mean"), "scheme_options"),
    (lambda m: m["scheme_options"].update(asm_center="middle"), "asm_center"),
])
def test_bad_metadata_is_refused_with_the_file_named(tmp_path, edit, expected):
    _, _, packed = _exported(tmp_path, "binaryvit")
    path = _resaved(tmp_path, packed, edit_metadata=edit)
    with pytest.raises(checkpoint.CheckpointError, match=expected) as error:
        engine.PackedViT.load(path)
    assert path in str(error.value)


# ---------------------------------------------------------------------------------------------
# the zero tail


def test_a_set_tail_bit_shifts_binary_gemm_which_is_why_it_is_checked():
    """The contract's reason: one tail bit set in the weight (not in the activation) lowers the dot
    by 2; check_zero_tail finds it; a K that 64 divides has no tail."""
    rng = np.random.default_rng(0)
    a, w = rng.standard_normal((5, 70)), rng.standard_normal((4, 70))
    a_bits, w_bits = kernels.pack_signs(a), kernels.pack_weight(w)
    exact = kernels.binary_gemm(a_bits, w_bits, 70)
    np.testing.assert_array_equal(exact, np.where(a < 0, -1, 1) @ np.where(w < 0, -1, 1).T)
    bad = w_bits.copy()
    bad[-1, 2] |= np.uint64(1) << np.uint64(63)
    shifted = kernels.binary_gemm(a_bits, bad, 70)
    assert (shifted[:, 2] == exact[:, 2] - 2).all() and (np.delete(shifted, 2, 1) == np.delete(exact, 2, 1)).all()
    kernels.check_zero_tail(w_bits, 70, "w", word_axis=0)
    with pytest.raises(ValueError, match=r"w has bits set in the tail.*K=70: bits 6\.\.63 of word 1.*index 2"):
        kernels.check_zero_tail(bad, 70, "w", word_axis=0)
    with pytest.raises(ValueError, match="a has bits set"):
        kernels.check_zero_tail(a_bits | np.uint64(1) << np.uint64(40), 70, "a")
    full = kernels.pack_signs(rng.standard_normal((3, 128)))
    kernels.check_zero_tail(~full, 128, "full")   # no tail when 64 divides K: every bit is data
    assert kernels.tail_mask(128) == 0 and kernels.tail_mask(70) == ~np.uint64((1 << 6) - 1)


@pytest.mark.parametrize("k", [1, 5, 63, 64, 65, 127, 200])
def test_packers_write_zero_tails(k):
    rng = np.random.default_rng(k)
    x = -np.abs(rng.standard_normal((3, k)))           # every element packs to 1: only the tail is 0
    for packed in (kernels.pack_signs(x), kernels.pack_bits(x != 0), kernels.pack_signs(x.astype(np.float16))):
        kernels.check_zero_tail(packed, k, "packed")
        assert (np.bitwise_count(packed).sum(axis=-1) == k).all()
    for plane in (kernels.pack_weight(x), *kernels.pack_ternary_weight(-np.ones((3, k)))):
        kernels.check_zero_tail(plane, k, "plane", word_axis=0)


def test_tail_bit_in_a_ternary_plane_is_refused_at_load(tmp_path):
    _, _, packed = _exported(tmp_path, "tervit")
    name = "blocks.0.mlp.fc2.weight_nonzero"     # K = mlp_hidden = 288: bits 32..63 of word 4 are tail

    def set_tail_bit(t):
        plane = t[name].copy()
        plane[-1, 5] |= np.uint64(1) << np.uint64(40)
        t[name] = plane

    with pytest.raises(checkpoint.CheckpointError, match=name + " has bits set in the tail"):
        engine.PackedViT.load(_resaved(tmp_path, packed, edit_tensors=set_tail_bit))


# ---------------------------------------------------------------------------------------------
# the packers' dtypes


@pytest.mark.parametrize("dtype", [np.float16, np.longdouble, ">f4", ">f8", "<f8", np.float32])
def test_pack_signs_every_float_dtype_is_exact(dtype):
    x = np.random.default_rng(1).standard_normal((4, 130))
    x[0, :4] = [0.0, -0.0, np.nan, -np.inf]
    x = x.astype(dtype)
    np.testing.assert_array_equal(kernels.pack_signs(x), kernels.pack_signs_reference(x))
    assert kernels.pack_signs(x)[0, 0] & np.uint64(0b1111) == np.uint64(0b1000)   # only -inf is negative


@pytest.mark.skipif(np.finfo(np.longdouble).tiny >= np.finfo(np.float64).smallest_subnormal,
                    reason="longdouble has no range beyond float64 here")
def test_pack_signs_longdouble_keeps_signs_that_float64_would_lose():
    x = np.array([[np.longdouble("-1e-4000"), np.longdouble("1e-4000"), np.longdouble(-1)]])
    assert x.astype(np.float64)[0, 0] == 0       # converted to float64 it would pack as +1
    assert kernels.pack_signs(x)[0, 0] == np.uint64(0b101)


@pytest.mark.parametrize("dtype", ["U3", "S3", object, "datetime64[s]"])
def test_pack_bits_refuses_non_numeric_masks(dtype):
    with pytest.raises(TypeError, match="bool or numeric mask"):
        kernels.pack_bits(np.zeros((2, 5), dtype))


@pytest.mark.parametrize("dtype", [np.float16, np.longdouble, ">i4", ">f4", np.complex64, np.uint8])
def test_pack_bits_numeric_masks_of_any_dtype(dtype):
    mask = np.random.default_rng(2).integers(0, 2, (3, 70)).astype(dtype)
    np.testing.assert_array_equal(kernels.pack_bits(mask), kernels.pack_bits_reference(mask))
