"""The mechanisms do what their papers say, measured on short training runs (not assumed):
GRS lowers the latent-weight sign-flip rate and the mass near zero; ASM raises the sign entropy of
the binarized activations."""
import json
import os

import numpy as np
import pytest

from minibvit import methods, train

pytestmark = pytest.mark.impl_specific  # tests minibvit itself (conftest.py: MINIBVIT_ONLY_MODULES)


def run_stage(tmp_path, tag, scheme, **kw):
    cfg = train.resolve_config(train.TrainConfig(
        dataset="synthetic", method="binaryvit", limit_per_class=60, embed_dim=32, depth=1, num_heads=2,
        patch_size=8, batch_size=32, epochs=2, log_every=1, out=str(tmp_path / tag), **kw))
    train_set, test_set = train.load_data(cfg)
    out_dir = str(tmp_path / tag / scheme)
    train.train_stage(cfg, methods.Stage(scheme, scheme), out_dir, train_set, test_set)
    return [json.loads(line) for line in open(os.path.join(out_dir, "log.jsonl")) if '"loss"' in line]


def test_grs_reduces_flip_rate_and_near_zero_mass(tmp_path):
    base = run_stage(tmp_path, "lam0", "binaryvit", grs_lambda=0.0, asm_center="shift")
    grs = run_stage(tmp_path, "lam", "binaryvit", grs_lambda=0.05, asm_center="shift", grs_warmup_epochs=0.5)
    half = len(base) // 2
    flips_base = np.mean([r["flip_rate"] for r in base[half:]])
    flips_grs = np.mean([r["flip_rate"] for r in grs[half:]])
    assert flips_base > 0, "the baseline must oscillate for the comparison to mean anything"
    assert flips_grs < 0.5 * flips_base, f"GRS flip rate {flips_grs:.2e} vs baseline {flips_base:.2e}"
    assert grs[-1]["near_zero_mass"] < 0.5 * base[-1]["near_zero_mass"], (grs[-1], base[-1])
    assert grs[-1]["bimodality"] > base[-1]["bimodality"]


@pytest.fixture(scope="module")
def binary_baseline(tmp_path_factory):
    return run_stage(tmp_path_factory.mktemp("baseline"), "binary", "binary")


@pytest.mark.parametrize("center", ["mean", "median", "token"])
def test_asm_raises_sign_entropy(tmp_path, center, binary_baseline):
    base = binary_baseline
    asm = run_stage(tmp_path, f"asm-{center}", "binaryvit", grs_lambda=0.0, asm_center=center)
    h_base = np.mean([r["sign_entropy"] for r in base])
    h_asm = np.mean([r["sign_entropy"] for r in asm])
    assert h_asm > h_base + 0.01, f"ASM ({center}) sign entropy {h_asm:.4f} vs binary {h_base:.4f}"
