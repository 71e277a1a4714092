"""The recipe switches of issue 17: --augment / --crop-padding, --kd, --ternary-granularity,
--tervit-direct and the budget rule (--epochs split over the quantized stages, --stage-epochs)."""
import json
import os

import numpy as np
import pytest

from minibvit import data, methods, train

pytestmark = pytest.mark.impl_specific  # tests minibvit itself (conftest.py: MINIBVIT_ONLY_MODULES)

TINY = dict(dataset="synthetic", limit_per_class=12, embed_dim=16, depth=1, num_heads=2, patch_size=8,
            batch_size=16, eval_batch_size=500, epochs=1, log_every=2)


def tiny(tmp_path, tag="run", **kw):
    return train.TrainConfig(**{**TINY, "out": str(tmp_path / tag), **kw})


def _small(name="synthetic", n_per_class=7, size=12):
    images, labels = data.make_synthetic(n_per_class, image_size=size, channels=3, seed=9)
    mean, std = data.channel_stats(images)
    return data.Dataset(images, labels, 10, data.SYNTHETIC_CLASSES, mean, std, name)


def _normalised(dataset, images):
    return ((images / 255.0 - dataset.mean) / dataset.std).transpose(0, 3, 1, 2)


# ------------------------------------------------------------------------------------------------
# --augment, --crop-padding
# ------------------------------------------------------------------------------------------------

def _epoch(dataset, **kw):
    return list(data.iterate_batches(dataset, 10, seed=5, epoch=3, **kw))


@pytest.mark.parametrize("mode", data.AUGMENT_MODES)
def test_every_augment_mode_is_deterministic_and_resumes_bit_identically(mode):
    dataset = _small()
    full = _epoch(dataset, augment=mode)
    again = _epoch(dataset, augment=mode)
    for (x1, y1), (x2, y2) in zip(full, again):
        assert np.array_equal(x1, x2) and np.array_equal(y1, y2)
    for start in (1, 3, len(full)):
        resumed = list(data.iterate_batches(dataset, 10, seed=5, epoch=3, start_step=start, augment=mode))
        assert len(resumed) == len(full) - start
        for (x1, y1), (x2, y2) in zip(full[start:], resumed):
            assert np.array_equal(x1, x2) and np.array_equal(y1, y2)
    other_epoch = list(data.iterate_batches(dataset, 10, seed=5, epoch=4, augment=mode))
    assert not np.array_equal(full[0][1], other_epoch[0][1])  # another permutation


def test_each_augment_mode_does_what_it_says():
    dataset = _small(n_per_class=20, size=8)
    order = np.random.default_rng([1, data._ORDER_STREAM, 4]).permutation(200)
    images = dataset.images[order]
    plain = _normalised(dataset, images)
    (none, y), = data.iterate_batches(dataset, 200, seed=1, epoch=4, augment="none")
    (off, _), = data.iterate_batches(dataset, 200, seed=1, epoch=4, augment=False)
    np.testing.assert_array_equal(y, dataset.labels[order])
    np.testing.assert_array_equal(none, off)  # exactly the unaugmented batch
    np.testing.assert_allclose(none, plain, rtol=1e-5, atol=1e-5)

    (flip, _), = data.iterate_batches(dataset, 200, seed=1, epoch=4, augment="flip")
    mirror = np.random.default_rng([1, data._AUGMENT_STREAM, 4, 0]).random(200) < 0.5
    assert 0 < mirror.sum() < 200
    np.testing.assert_allclose(flip, np.where(mirror[:, None, None, None], plain[..., ::-1], plain), rtol=1e-5,
                               atol=1e-5)

    for mode, flips in (("crop", False), ("crop-flip", True)):
        for padding in (None, 2):
            (x, _), = data.iterate_batches(dataset, 200, seed=1, epoch=4, augment=mode, padding=padding)
            rng = np.random.default_rng([1, data._AUGMENT_STREAM, 4, 0])
            pad = data.crop_padding(8) if padding is None else padding
            expected = data.random_crop_flip(images, pad, flips, rng)
            np.testing.assert_allclose(x, _normalised(dataset, expected), rtol=1e-5, atol=1e-5)
    (default, _), = data.iterate_batches(dataset, 200, seed=1, epoch=4)  # augment=True: the dataset's default
    (crop_flip, _), = data.iterate_batches(dataset, 200, seed=1, epoch=4, augment="crop-flip")
    np.testing.assert_array_equal(default, crop_flip)
    (p1, _), = data.iterate_batches(dataset, 200, seed=1, epoch=4, augment="crop", padding=1)
    (p3, _), = data.iterate_batches(dataset, 200, seed=1, epoch=4, augment="crop", padding=3)
    assert not np.array_equal(p1, p3)
    with pytest.raises(ValueError, match="augment='rotate' is not an augmentation"):
        data.iterate_batches(dataset, 10, seed=1, epoch=0, augment="rotate")
    with pytest.raises(ValueError, match="padding must be a positive integer"):
        data.iterate_batches(dataset, 10, seed=1, epoch=0, augment="crop", padding=0)


def test_augment_defaults_and_refusals(tmp_path):
    assert train.resolve_config(train.TrainConfig(dataset="fashion-mnist")).augment == "flip"
    for name in ("synthetic", "cifar10"):
        assert train.resolve_config(train.TrainConfig(dataset=name)).augment == "crop-flip"
    cfg = train.resolve_config(tiny(tmp_path, augment="crop", crop_padding=2))
    assert (cfg.augment, cfg.crop_padding) == ("crop", 2)
    with pytest.raises(ValueError, match="--crop-padding applies to the random crop"):
        train.resolve_config(tiny(tmp_path, augment="flip", crop_padding=2))
    with pytest.raises(ValueError, match="--augment must be one of"):
        train.resolve_config(tiny(tmp_path, augment="rotate"))
    with pytest.raises(ValueError, match="do not apply to --dataset imagenet"):
        train.resolve_config(train.TrainConfig(dataset="imagenet", data_dir="hub", augment="none"))
    args = train._parser().parse_args(["--augment", "none", "--crop-padding", "3"])
    assert (args.augment, args.crop_padding) == ("none", 3)


def test_training_sees_the_chosen_augmentation(tmp_path):
    cfg = train.resolve_config(tiny(tmp_path, augment="none"))
    train_set, _ = train.load_data(cfg)
    got = list(train.train_batches(train_set, cfg, 2, 0, True))
    want = list(data.iterate_batches(train_set, cfg.batch_size, cfg.seed, 2, augment=False))
    assert len(got) == len(want)
    for (x1, y1), (x2, y2) in zip(got, want):
        assert np.array_equal(x1, x2) and np.array_equal(y1, y2)
    cfg = train.resolve_config(tiny(tmp_path, augment="crop", crop_padding=1))
    (x, _), = list(train.train_batches(train_set, cfg, 2, 0, True))[:1]
    (x_want, _), = list(data.iterate_batches(train_set, cfg.batch_size, cfg.seed, 2, augment="crop", padding=1))[:1]
    np.testing.assert_array_equal(x, x_want)
    results = train.run(tiny(tmp_path, "flip", method="fp", augment="flip", max_steps=1))
    saved = json.load(open(os.path.join(os.path.dirname(results["fp"][0]), "config.json")))
    assert saved["train_config"]["augment"] == "flip"


# ------------------------------------------------------------------------------------------------
# --kd
# ------------------------------------------------------------------------------------------------

def _log_softmax(z):
    z = z - z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def _ce(z, target):
    """Mean soft-target cross-entropy and its gradient, float64, written out."""
    logp = _log_softmax(z)
    return -(target * logp).sum() / len(z), (np.exp(logp) - target) / len(z)


def _onehot(labels, classes, smoothing=0.0):
    return np.eye(classes)[labels] * (1 - smoothing) + smoothing / classes


class _LossCfg:
    label_smoothing, kd_temperature, kd_alpha = 0.1, 2.0, 0.3


def _stage(method, kd):
    return methods.recipe(method, kd)[-1]


def test_each_kd_kind_gives_its_loss_in_closed_form():
    rng = np.random.default_rng(0)
    s, t = rng.standard_normal((5, 4)), 3 * rng.standard_normal((5, 4))
    y = np.array([0, 1, 2, 3, 1])
    t_labels = t.argmax(axis=1)
    assert not np.array_equal(t_labels, y)
    cfg, eps, tau, a = _LossCfg, _LossCfg.label_smoothing, _LossCfg.kd_temperature, _LossCfg.kd_alpha
    ce_y, g_y = _ce(s, _onehot(y, 4, eps))
    ce_t, g_t = _ce(s, _onehot(t_labels, 4))
    p_t, logp_s = np.exp(_log_softmax(t / tau)), _log_softmax(s / tau)
    kl = tau ** 2 * (p_t * (np.log(p_t) - logp_s)).sum() / 5
    g_kl = tau * (np.exp(logp_s) - p_t) / 5
    expected = {"none": (ce_y, g_y), "soft": ((1 - a) * ce_y + a * kl, (1 - a) * g_y + a * g_kl),
                "hard": (0.5 * ce_y + 0.5 * ce_t, 0.5 * g_y + 0.5 * g_t)}
    for method in ("binary", "binaryvit", "tervit"):
        for kind, (loss, grad) in expected.items():
            stage = _stage(method, kind)
            assert stage.kd == kind and not stage.distilled
            got, dlogits = train._loss(stage, cfg, s, y, t)
            np.testing.assert_allclose(got, loss, rtol=1e-12, err_msg=f"{method} {kind}")
            np.testing.assert_allclose(dlogits, grad, rtol=1e-12, atol=1e-15, err_msg=f"{method} {kind}")
    # gsb: hard keeps the distillation token (DeiT: class head on y, distillation head on the teacher)
    stage = _stage("gsb", "hard")
    assert stage.distilled and stage == methods.METHODS["gsb"].final
    s2 = rng.standard_normal((5, 4))
    got, (d_cls, d_dist) = train._loss(stage, cfg, (s, s2), y, t)
    ce_t2, g_t2 = _ce(s2, _onehot(t_labels, 4))
    np.testing.assert_allclose(got, 0.5 * ce_y + 0.5 * ce_t2, rtol=1e-12)
    np.testing.assert_allclose(d_cls, 0.5 * g_y, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(d_dist, 0.5 * g_t2, rtol=1e-12, atol=1e-15)
    for kind in ("none", "soft"):  # head only
        stage = _stage("gsb", kind)
        assert not stage.distilled
        got, dlogits = train._loss(stage, cfg, s, y, t)
        np.testing.assert_allclose(got, expected[kind][0], rtol=1e-12)


def test_recipe_applies_kd_to_the_quantized_stages_and_keeps_the_init():
    for method in ("binary", "binaryvit", "gsb", "tervit"):
        default = methods.METHODS[method].stages
        assert methods.recipe(method) == default
        for kind in methods.KD_KINDS:
            stages = methods.recipe(method, kind)
            assert [s.name for s in stages] == [s.name for s in default]
            assert [s.init for s in stages] == [s.init for s in default]  # init is not distillation
            assert stages[0].kd == "none" and all(s.kd == kind for s in stages[1:])
    assert [s.distilled for s in methods.recipe("gsb", "none")] == [False, False, False]
    assert [s.distilled for s in methods.recipe("gsb", "hard")] == [False, True, True]
    with pytest.raises(ValueError, match="--kd does not apply to --method fp"):
        methods.recipe("fp", "soft")


def test_kd_options_are_refused_where_they_do_not_apply(tmp_path):
    with pytest.raises(ValueError, match=r"--kd do\(es\) not apply to --method fp"):
        train.resolve_config(tiny(tmp_path, method="fp", kd="none"))
    with pytest.raises(ValueError, match=r"--kd-alpha do\(es\) not apply to --method binary with --kd none.*add --kd soft"):
        train.resolve_config(tiny(tmp_path, method="binary", kd="none", kd_alpha=0.3))
    cfg = train.resolve_config(tiny(tmp_path, method="gsb", kd="soft", kd_temperature=2.0))
    assert (cfg.kd, cfg.kd_temperature) == ("soft", 2.0)
    assert train.resolve_config(tiny(tmp_path, method="tervit")).kd is None  # each stage's own kind
    with pytest.raises(ValueError, match="--kd must be one of"):
        train.resolve_config(tiny(tmp_path, method="binary", kd="feature"))
    assert train.main(["--method", "fp", "--kd", "soft", "--dataset", "synthetic"]) == 2


class _Spy:
    def __init__(self, monkeypatch):
        self.seen, real = {}, train.train_stage

        def spy(cfg, stage, out_dir, train_set, test_set, init_state=None, teacher=None):
            self.seen[stage.name] = (stage, init_state, teacher)
            return real(cfg, stage, out_dir, train_set, test_set, init_state, teacher)

        monkeypatch.setattr(train, "train_stage", spy)


def _config(results, stage):
    return json.load(open(os.path.join(os.path.dirname(results[stage][0]), "config.json")))


def _model_weights(path):
    model, _ = train.load_model(path)
    return model.state_dict()


def test_kd_none_trains_without_a_teacher_but_still_starts_from_it(tmp_path, monkeypatch):
    spy = _Spy(monkeypatch)
    results = train.run(tiny(tmp_path, method="binary", kd="none", max_steps=2))
    stage, init_state, teacher = spy.seen["binary"]
    assert stage.kd == "none" and teacher is None and init_state is not None
    for k, v in _model_weights(results["teacher"][0]).items():
        np.testing.assert_array_equal(init_state[k], v)
    saved = _config(results, "binary")
    assert (saved["kd"], saved["teacher"], saved["init"]) == ("none", None, {"stage": "teacher"})
    assert _config(results, "teacher")["init"] is None
    # with --init-from no teacher checkpoint exists at all: fine without distillation, refused with it
    init = results["binary"][0]
    train.run(tiny(tmp_path, "nokd", method="binaryvit", kd="none", init_from=init, max_steps=1))
    assert spy.seen["binaryvit"][2] is None
    with pytest.raises(ValueError, match="which --init-from skips: give the teacher with --teacher"):
        train.run(tiny(tmp_path, "soft", method="binaryvit", init_from=init, max_steps=1))


def test_tervit_distils_from_its_fp_stage_and_gsb_drops_the_token(tmp_path, monkeypatch):
    spy = _Spy(monkeypatch)
    results = train.run(tiny(tmp_path, method="tervit", kd="soft", max_steps=1))
    fp = _model_weights(results["fp"][0])
    for name in ("tervit_w8a8", "tervit"):
        stage, _, teacher = spy.seen[name]
        assert stage.kd == "soft" and teacher is not None
        for k, v in fp.items():
            np.testing.assert_array_equal(teacher.state_dict()[k], v)
        assert _config(results, name)["teacher"] == {"stage": "fp"}
    results = train.run(tiny(tmp_path, "gsb", method="gsb", kd="none", max_steps=1))
    for name in ("gsb_stage1", "gsb"):
        saved = _config(results, name)
        assert saved["kd"] == "none" and not saved["distilled"] and not saved["model_config"]["distilled"]
        assert spy.seen[name][2] is None


# ------------------------------------------------------------------------------------------------
# --ternary-granularity, --tervit-direct
# ------------------------------------------------------------------------------------------------

def _ternary(w, per_channel):
    """TWN's ternary weights in closed form: alpha sign(W) 1[|W| > Delta], Delta = 0.7 mean|W| and alpha
    the mean |W| above Delta, per row or over the whole tensor."""
    a = np.abs(w)
    axis = dict(axis=1, keepdims=True) if per_channel else {}
    mask = a > 0.7 * a.mean(**axis)
    alpha = (a * mask).sum(**axis) / mask.sum(**axis)
    return alpha * np.sign(w) * mask


def test_ternary_granularity_changes_the_quantizer_to_per_tensor():
    from minibvit.model import ViTConfig

    cfg = ViTConfig(image_size=16, patch_size=8, in_chans=3, num_classes=10, embed_dim=16, depth=1, num_heads=2)
    role = "blocks.0.mlp.fc1.weight"
    w = np.random.default_rng(1).standard_normal((cfg.mlp_hidden, cfg.embed_dim)) * np.linspace(0.2, 3, cfg.mlp_hidden)[:, None]
    alphas = {}
    for granularity, spec in (("channel", "w_ternary_channel"), ("tensor", "w_ternary_tensor")):
        options = methods.QuantizerOptions(ternary_granularity=granularity)
        assert methods.resolve(cfg, "tervit", options=options)[role] == spec
        q = methods.build_quantizers(cfg, "tervit", options=options, dtype="float64")[role]
        wq, _ = q.forward(w, True)
        np.testing.assert_allclose(wq, _ternary(w, granularity == "channel"), rtol=1e-12, atol=0)
        alphas[granularity] = np.unique(np.abs(wq[wq != 0]))
    assert len(alphas["tensor"]) == 1 and len(alphas["channel"]) == cfg.mlp_hidden
    assert methods.resolve(cfg, "binary", options=methods.QuantizerOptions(ternary_granularity="tensor")) == \
        methods.resolve(cfg, "binary")
    with pytest.raises(ValueError, match="ternary_granularity='row' is not supported"):
        methods.QuantizerOptions(ternary_granularity="row")


def test_ternary_granularity_and_direct_runs_are_recorded_and_refused_elsewhere(tmp_path, monkeypatch):
    for method, option in (("binary", dict(ternary_granularity="tensor")), ("gsb", dict(tervit_direct=True)),
                           ("fp", dict(tervit_direct=True))):
        flag = "--" + next(iter(option)).replace("_", "-")
        with pytest.raises(ValueError, match=f"{flag} do\\(es\\) not apply to --method {method}"):
            train.resolve_config(tiny(tmp_path, method=method, **option))
    spy = _Spy(monkeypatch)
    results = train.run(tiny(tmp_path, method="tervit", ternary_granularity="tensor", tervit_direct=True, max_steps=1))
    assert list(results) == ["fp", "tervit"] and "tervit_w8a8" not in spy.seen
    stage, init_state, _ = spy.seen["tervit"]
    assert stage.init == "fp"
    for k, v in _model_weights(results["fp"][0]).items():
        np.testing.assert_array_equal(init_state[k], v)
    saved = _config(results, "tervit")
    assert saved["train_config"]["tervit_direct"] and saved["init"] == {"stage": "fp"}
    assert saved["scheme_options"]["ternary_granularity"] == "tensor"
    assert saved["stage_epochs"] == {"fp": 1, "tervit": 1}
    model, _ = train.load_model(results["tervit"][0])
    q = model.quantizers["blocks.0.attn.qkv.weight"]
    wq, _ = q.forward(model.params["blocks.0.attn.qkv.weight"], False)
    assert len(np.unique(np.abs(wq[wq != 0]))) == 1  # one alpha for the whole tensor
    args = train._parser().parse_args(["--tervit-direct", "--ternary-granularity", "tensor"])
    assert args.tervit_direct is True and train._parser().parse_args([]).tervit_direct is None


# ------------------------------------------------------------------------------------------------
# the budget rule
# ------------------------------------------------------------------------------------------------

def test_epochs_are_the_total_of_the_quantized_stages():
    def split(method, epochs, teacher_epochs=None, explicit=None, **kw):
        return methods.stage_epochs(methods.recipe(method, **kw), epochs, teacher_epochs, explicit)

    assert split("fp", 5) == {"fp": 5}
    assert split("fp", 5, 7) == {"fp": 7}
    assert split("binary", 5) == {"teacher": 5, "binary": 5}
    assert split("binaryvit", 4, 9) == {"teacher": 9, "binaryvit": 4}
    assert split("tervit", 5) == {"fp": 5, "tervit_w8a8": 3, "tervit": 2}
    assert split("tervit", 6, 2) == {"fp": 2, "tervit_w8a8": 3, "tervit": 3}
    assert split("tervit", 5, direct=True) == {"fp": 5, "tervit": 5}
    assert split("gsb", 7) == {"teacher": 7, "gsb_stage1": 4, "gsb": 3}
    assert split("gsb", 1) == {"teacher": 1, "gsb_stage1": 1, "gsb": 1}  # at least one epoch each
    for method in ("binary", "binaryvit", "gsb", "tervit"):
        for epochs in range(2, 12):
            got = split(method, epochs)
            assert sum(got.values()) - got[methods.METHODS[method].stages[0].name] == epochs
    assert split("tervit", 6, explicit={"tervit": 4}) == {"fp": 6, "tervit_w8a8": 3, "tervit": 4}
    assert split("gsb", 6, explicit={"teacher": 2, "gsb_stage1": 5, "gsb": 1}) == \
        {"teacher": 2, "gsb_stage1": 5, "gsb": 1}
    with pytest.raises(ValueError, match=r"'tervit_w8a8', not a stage of this run \(its stages: fp, tervit\)"):
        split("tervit", 4, explicit={"tervit_w8a8": 2}, direct=True)


def test_stage_epochs_flag(tmp_path):
    assert train.parse_stage_epochs("tervit_w8a8=2, tervit=4") == {"tervit_w8a8": 2, "tervit": 4}
    for bad, message in (("tervit=0", "is not NAME=N"), ("tervit", "is not NAME=N"), ("=3", "is not NAME=N"),
                         ("tervit=1,tervit=2", "twice")):
        with pytest.raises(ValueError, match=message):
            train.resolve_config(tiny(tmp_path, method="tervit", stage_epochs=bad))
    with pytest.raises(ValueError, match=r"'binary', not a stage of this run \(its stages: teacher, binaryvit\)"):
        train.resolve_config(tiny(tmp_path, method="binaryvit", stage_epochs="binary=2"))
    proc_args = ["--method", "gsb", "--stage-epochs", "gsb=3", "--dataset", "synthetic"]
    assert train._parser().parse_args(proc_args).stage_epochs == "gsb=3"
    assert train.main(["--method", "gsb", "--stage-epochs", "tervit=3", "--dataset", "synthetic",
                       "--out", str(tmp_path / "x")]) == 2


def test_each_stage_trains_its_share_and_records_every_stage(tmp_path):
    results = train.run(tiny(tmp_path, method="tervit", epochs=3, teacher_epochs=1))
    want = {"fp": 1, "tervit_w8a8": 2, "tervit": 1}
    for name, epochs in want.items():
        saved = _config(results, name)
        assert saved["stage_epochs"] == want
        log = [json.loads(line) for line in open(os.path.join(os.path.dirname(results[name][0]), "log.jsonl"))]
        assert [r["epoch"] for r in log if "test_acc" in r] == list(range(epochs)), name
    results = train.run(tiny(tmp_path, "explicit", method="binary", stage_epochs="binary=2"))
    assert _config(results, "binary")["stage_epochs"] == {"teacher": 1, "binary": 2}
    log = open(os.path.join(os.path.dirname(results["binary"][0]), "log.jsonl")).read()
    assert log.count('"test_acc"') == 2


def test_init_from_trains_the_final_stage_for_all_the_epochs(tmp_path):
    fp = train.run(tiny(tmp_path, "fp", method="fp", max_steps=1))["fp"][0]
    results = train.run(tiny(tmp_path, method="tervit", init_from=fp, epochs=2))
    assert list(results) == ["tervit"] and _config(results, "tervit")["stage_epochs"] == {"tervit": 2}
    assert _config(results, "tervit")["init"] == {"checkpoint": fp}
    log = open(os.path.join(os.path.dirname(results["tervit"][0]), "log.jsonl")).read()
    assert log.count('"test_acc"') == 2
    with pytest.raises(ValueError, match="not a stage of this run"):
        train.resolve_config(tiny(tmp_path, method="tervit", init_from=fp, stage_epochs="tervit_w8a8=1"))


def test_per_tensor_ternary_exports_and_runs_bit_exact_in_the_packed_engine(tmp_path):
    from test_engine import assert_bit_exact, exported, images

    model, eng, _ = exported(tmp_path, "tervit", ternary_granularity="tensor")
    role = "blocks.0.mlp.fc1.weight"
    assert eng.options.ternary_granularity == "tensor" and not model.quantizers[role].per_channel
    assert_bit_exact(model, eng, images(model.cfg, 5))
