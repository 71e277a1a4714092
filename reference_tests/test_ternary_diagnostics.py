"""TerViT's ternary weights in log.jsonl: the rate at which their codes change (any change of the
ternary code, per step, over the logging interval and over the epoch) and their zero mass."""
import json
import os

import numpy as np
import pytest

from minibvit import diagnostics, methods, quant, train
from minibvit.model import ViT, ViTConfig

pytestmark = pytest.mark.impl_specific  # tests minibvit itself (conftest.py: MINIBVIT_ONLY_MODULES)

CFG = ViTConfig(image_size=16, patch_size=8, in_chans=3, num_classes=10, embed_dim=16, depth=1, num_heads=2)


def _model(table, granularity="channel"):
    options = methods.QuantizerOptions(ternary_granularity=granularity)
    return ViT(CFG, quantizers=methods.build_quantizers(CFG, table, options=options, dtype="float64"),
               dtype=np.float64, seed=0)


def test_code_change_rate_and_zero_mass():
    assert diagnostics.code_change_rate(np.array([1, 0, -1, 0]), np.array([1, 1, 0, 0])) == 0.5
    assert diagnostics.code_change_rate(np.array([True, False]), np.array([True, False])) == 0.0
    assert diagnostics.zero_mass(np.array([[0, 1], [-1, 0], [0, 0]])) == 4 / 6
    with pytest.raises(ValueError, match="equal shapes"):
        diagnostics.code_change_rate(np.zeros(2), np.zeros(3))
    w = np.array([[1.0, -0.0, 0.0, -2.0]])
    assert diagnostics.sign_flip_rate(w, -w) == 0.5  # sign(0) = +1 on both sides of -0.0


@pytest.mark.parametrize("granularity", ["channel", "tensor"])
def test_weight_code_is_the_quantizers_own_code(granularity):
    model = _model("tervit", granularity)
    roles = methods.ternary_weight_roles(model.quantizers)
    assert sorted(roles) == sorted(r for r, spec in methods.resolve(CFG, "tervit").items() if spec.startswith("w_ternary"))
    for role in roles:
        w = model.params[role]
        codes = diagnostics.weight_code(model, role)
        wq, _ = model.quantizers[role].forward(w, False)
        np.testing.assert_array_equal(codes, np.sign(wq))  # alpha > 0: the code is the sign of the output
    binary = _model("binary")
    role = methods.binarized_weight_roles(binary.quantizers)[0]
    w = binary.params[role]
    np.testing.assert_array_equal(diagnostics.weight_code(binary, role), (w - w.mean(axis=1, keepdims=True)) >= 0)


def test_flip_counter_counts_every_change_of_a_ternary_code():
    model = _model("tervit")
    roles = methods.ternary_weight_roles(model.quantizers)
    counter = diagnostics.FlipCounter()
    counter.update(model, roles)  # first step: nothing to compare with
    assert counter.take() is None
    expected = []
    rng = np.random.default_rng(0)
    for _ in range(3):
        before = {r: diagnostics.weight_code(model, r) for r in roles}
        for r in roles:
            model.params[r][...] += 0.3 * rng.standard_normal(model.params[r].shape) * np.abs(model.params[r]).mean()
        counter.update(model, roles)
        expected.append(np.mean([np.mean(before[r] != quant.ternary_codes(model.params[r])[0]) for r in roles]))
    assert 0 < min(expected)
    np.testing.assert_allclose(counter.take(), np.mean(expected), rtol=1e-12)
    assert counter.take() is None  # the interval restarts
    np.testing.assert_allclose(counter.take_epoch(), np.mean(expected), rtol=1e-12)  # the epoch does not
    out = diagnostics.ternary_diagnostics(model, roles, counter)
    zero = np.mean([np.mean(quant.ternary_codes(model.params[r])[0] == 0) for r in roles])
    assert out == {"ternary_zero_mass": pytest.approx(zero, rel=1e-12)} and 0.2 < zero < 0.7
    assert diagnostics.ternary_diagnostics(model, [], counter) == {}


def test_tervit_logs_ternary_flip_rate_and_zero_mass(tmp_path):
    cfg = train.TrainConfig(dataset="synthetic", limit_per_class=12, embed_dim=16, depth=1, num_heads=2, patch_size=8,
                            batch_size=16, eval_batch_size=500, epochs=4, log_every=1, method="tervit",
                            out=str(tmp_path / "run"))
    results = train.run(cfg)  # fp 4 epochs, tervit_w8a8 2, tervit 2
    stage_dir = os.path.dirname(results["tervit"][0])
    records = [json.loads(line) for line in open(os.path.join(stage_dir, "log.jsonl"))]
    steps = [r for r in records if "loss" in r]
    epochs = [r for r in records if "test_acc" in r]
    assert len(epochs) == 2
    assert "ternary_flip_rate" not in steps[0] and all("ternary_flip_rate" in r for r in steps[1:])
    assert all(0 <= r["ternary_flip_rate"] <= 1 and 0 < r["ternary_zero_mass"] < 1 for r in steps[1:])
    assert any(r["ternary_flip_rate"] > 0 for r in steps[1:])
    for epoch, record in enumerate(epochs):
        in_epoch = [r["ternary_flip_rate"] for r in steps if r["epoch"] == epoch and "ternary_flip_rate" in r]
        np.testing.assert_allclose(record["ternary_flip_rate"], np.mean(in_epoch), rtol=1e-9)
    model, _ = train.load_model(os.path.join(stage_dir, "last.safetensors"))
    roles = methods.ternary_weight_roles(model.quantizers)
    zero = np.mean([diagnostics.zero_mass(diagnostics.weight_code(model, r)) for r in roles])
    np.testing.assert_allclose(epochs[-1]["ternary_zero_mass"], zero, rtol=1e-12)
    for stage in ("fp", "tervit_w8a8"):
        text = open(os.path.join(os.path.dirname(results[stage][0]), "log.jsonl")).read()
        assert "ternary_" not in text
