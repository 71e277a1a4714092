"""Train a low-bit ViT: ``python -m minibvit.train --dataset fashion-mnist --method binaryvit``.

One command runs a method's whole recipe. Earlier stages (a full-precision teacher, TerViT's 8-bit
stage, GSB's stage 1) are trained into ``<out>/<stage>/`` or reused when that directory already holds
a finished stage; ``--teacher`` / ``--init-from`` replace them with your own checkpoints.

    method     stages (each initialised from the one before)          distillation (--kd, default)
    fp         fp                                                     -
    binary     teacher (fp) -> binary                                 soft KD from the teacher
    binaryvit  teacher (fp) -> binaryvit (binary + GRS + ASM)          soft KD from the teacher
    tervit     fp -> tervit_w8a8 -> tervit (ternary weights, A8)      none (--tervit-direct: fp -> tervit)
    gsb        teacher (fp) -> gsb_stage1 (binary MLP weights) -> gsb DeiT hard distillation (dist token)

The first (full-precision) stage trains --teacher-epochs (default --epochs) and is the teacher of
every distilled stage. --epochs is the TOTAL of the quantized stages after it, split evenly (tervit
and gsb: --epochs 6 is 3 + 3; binary: 6), so methods get equal quantized budgets; --stage-epochs
NAME=N sets stages by name. The stages, their quantizer tables and which options apply to which
method are data: minibvit.methods (docs/methods.md).

Every stage writes ``last.safetensors`` (also every ``--save-every`` steps), ``best.safetensors``
(best test accuracy), ``log.jsonl`` (every metric and diagnostic), ``config.json`` (the resolved
configuration) and, with matplotlib installed, ``curves.png`` and ``weights.png``. ``--resume``
continues a stopped run exactly: the batches, augmentation and dropout of step t depend only on
(seed, epoch, step), so a resumed run ends with bit-identical weights.

log.jsonl is as durable as the checkpoint: it is flushed before every save, the checkpoint carries
the epoch's running sums (so a resumed epoch's train loss and accuracy cover the whole epoch), and a
resumed (or fresh) stage first drops the records written after the checkpoint's position, which it
then writes again: every step appears once. Each stage first runs one throwaway step on a copy of
the model to compile Numba's kernels; its time is the first epoch record's ``warmup_s``, not part of
``epoch_time_s`` / ``images_per_s``. Warnings (stderr and ``{"stage", "epoch", "step", "warning"}``
records): an activation quantizer that passes nothing on after the first step (BiT's unsigned
attention binarizer outputs all zeros on the near-uniform attention of a weak teacher), and a model
that predicts one class for every test image.
"""
if __name__ == "__main__":  # before NumPy loads its thread pools (minibvit.process)
    from minibvit.process import configure_process

    configure_process()

import argparse  # noqa: E402
import contextlib  # noqa: E402
import copy  # noqa: E402
import dataclasses  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import signal  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402

import numpy as np  # noqa: E402

from . import checkpoint, data, diagnostics, distributed, methods, ops  # noqa: E402
from .loader import LoaderError  # noqa: E402
from .model import PRESETS, ViT, ViTConfig  # noqa: E402
from .optim import AdamW, clip_grad_norm, cosine_lr  # noqa: E402


# ---------------------------------------------------------------------------------------------
# configuration

GROUPS = ("data", "model", "optimisation", "method options", "run")
DATASET_CHOICES = data.DATASET_NAMES + ("imagenet",)
IMAGENET_OPTIONS = ("rand_augment", "mixup", "cutmix")  # DeiT's augmentation switches (random erasing: every dataset)
DTYPES = ("float32", "float64")


def _f(group, help, default=None, shown=None, choices=None):
    """A TrainConfig field: its argparse group, help text, the default as --help shows it and the
    values --help lists (choices; validate checks them)."""
    return field(default=default, metadata={"group": group, "help": help, "choices": choices,
                                            "shown": shown if shown is not None else default})


def _m(name):
    """A method-option field: default None (= not given), help and shown default from the registry."""
    o = methods.OPTION_BY_NAME[name]
    takes = ", ".join(m.name for m in methods.METHODS.values() if name in m.options)
    return field(default=None, metadata={"group": "method options", "help": f"[{takes}] {o.help}",
                                         "shown": o.shown_default})


@dataclass
class TrainConfig:
    """Every option of a training run, grouped (the argparse groups of --help). None means "not
    given": resolve_config fills it from the dataset's defaults or the method option's default, and
    refuses method options that do not apply to the method (methods.check_options)."""

    # data
    dataset: str = _f("data", f"one of {', '.join(DATASET_CHOICES)}", "fashion-mnist")
    data_dir: str = _f("data", "local dataset files (cifar-10-batches-py/bin, cifar-100-python, Fashion-MNIST IDX files, an image folder; "
                       "for imagenet the root holding train/<wnid>/*.JPEG and val/, or 'hub' for the Hugging Face "
                       "ILSVRC/imagenet-1k: docs/imagenet.md)", shown="the dataset's standard location")
    image_size: int = _f("data", "resize images to this size", shown="the dataset's")
    limit_per_class: int = _f("data", "train on N images per class (GSB's small-data setting)", shown="all")
    fraction: float = _f("data", "or train on this fraction of every class, in (0, 1]", shown="all")
    augment: str = _f("data", "training augmentation: a horizontal flip, a random crop of the zero-padded image, both, "
                      "or none (not for imagenet: its DeiT switches are below)", shown="by dataset",
                      choices=data.AUGMENT_MODES)
    crop_padding: int = _f("data", "pixels of zero padding on every side before the random crop",
                           shown="image size / 8, at least 1")
    workers: int = _f("data", "[imagenet] JPEG-decoding worker processes (per rank)", 4)
    rand_augment: int = _f("data", "[imagenet] RandAugment ops per image at DeiT's magnitude 9 +- 0.5; 0 turns it off",
                           shown="2 (DeiT)")
    mixup: float = _f("data", "[imagenet] mixup alpha (soft targets); 0 turns mixup off", shown="0.8 (DeiT)")
    cutmix: float = _f("data", "[imagenet] cutmix alpha (soft targets); 0 turns cutmix off", shown="1.0 (DeiT)")
    random_erasing: float = _f("data", "random-erasing probability per image (a box of N(0, 1) noise), in [0, 1]; "
                               "0 turns it off", shown="by dataset (imagenet: 0.25, DeiT)")
    # model
    model: str = _f("model", f"model preset, one of {', '.join(PRESETS)}", shown="by dataset")
    patch_size: int = _f("model", "patch size", shown="the preset's")
    embed_dim: int = _f("model", "embedding width (divisible by --num-heads)", shown="the preset's")
    depth: int = _f("model", "number of transformer blocks", shown="the preset's")
    num_heads: int = _f("model", "attention heads", shown="the preset's")
    mlp_ratio: float = _f("model", "MLP hidden width / embedding width", shown="the preset's")
    drop_path: float = _f("model", "stochastic-depth rate, in [0, 1)", shown=0.0)
    # optimisation
    epochs: int = _f("optimisation", "the TOTAL epochs of the method's quantized stages (every stage after the first), "
                     "split evenly over them (tervit 5: 3 + 2; the fp method: its one stage)", shown="by dataset")
    teacher_epochs: int = _f("optimisation", "epochs of the first, full-precision stage", shown="--epochs")
    stage_epochs: str = _f("optimisation", "NAME=N[,NAME=N...]: epochs of the named stages (the others keep "
                           "their share of --epochs)", shown="the split of --epochs")
    batch_size: int = _f("optimisation", "training batch size", shown="by dataset")
    lr: float = _f("optimisation", "peak AdamW learning rate (cosine schedule)", shown="by dataset")
    min_lr: float = _f("optimisation", "final learning rate of the cosine schedule", 1e-5)
    warmup_epochs: float = _f("optimisation", "epochs of linear learning-rate warm-up", 0.5)
    weight_decay: float = _f("optimisation", "AdamW decoupled weight decay", 0.05)
    label_smoothing: float = _f("optimisation", "label smoothing of the cross-entropy, in [0, 1)", 0.1)
    clip_grad: float = _f("optimisation", "clip the global gradient norm to this (0: no clipping)", 5.0)
    accum_steps: int = _f("optimisation", "micro-steps per optimizer step: each --batch-size batch is computed in this "
                          "many parts (less memory, the same global batch)", 1)
    # method and its options
    method: str = _f("method options", f"one of {', '.join(methods.METHODS)}: runs the method's whole recipe", "fp")
    teacher: str = _f("method options", "a full-precision minibvit checkpoint: the teacher to distil from, or "
                      "TerViT's fp stage (it replaces the recipe's full-precision stage)",
                      shown="trained first")
    init_from: str = _f("method options", "a minibvit checkpoint to start the final stage from (skips the earlier stages)",
                        shown="the previous stage")
    kd: str = _m("kd")
    kd_temperature: float = _m("kd_temperature")
    kd_alpha: float = _m("kd_alpha")
    grs_lambda: float = _m("grs_lambda")
    grs_variant: str = _m("grs_variant")
    grs_warmup_epochs: float = _m("grs_warmup_epochs")
    grs_start_epoch: float = _m("grs_start_epoch")
    grs_schedule: str = _m("grs_schedule")
    grs_layer_norm: str = _m("grs_layer_norm")
    grs_flip_window: float = _m("grs_flip_window")
    asm: str = _m("asm")
    asm_center: str = _m("asm_center")
    asm_momentum: float = _m("asm_momentum")
    asm_where: str = _m("asm_where")
    asm_scale: str = _m("asm_scale")
    gsb_mode: str = _m("gsb_mode")
    gsb_max_over: str = _m("gsb_max_over")
    ternary_granularity: str = _m("ternary_granularity")
    tervit_direct: bool = _m("tervit_direct")
    # run
    out: str = _f("run", "run directory; each stage writes <out>/<stage>/", shown="runs/<dataset>-<method>")
    seed: int = _f("run", "seed of the weights, batches, augmentation and dropout", 0)
    save_every: int = _f("run", "steps between mid-epoch checkpoints", 200)
    log_every: int = _f("run", "steps between diagnostic records", 10)
    eval_batch_size: int = _f("run", "evaluation batch size", 256)
    eval_every: int = _f("run", "epochs between test evaluations (the last epoch is always evaluated; "
                         "best.safetensors is the best evaluated epoch)", 1)
    resume: bool = _f("run", "continue every stage from its last.safetensors", False)
    max_steps: int = _f("run", "stop each stage after this many steps (smoke tests)", shown="no limit")
    dtype: str = _f("run", f"floating type of the weights and the arithmetic, one of {', '.join(DTYPES)} "
                    "(float64: equivalence tests)", "float32")

    def method_options(self):
        """{option: value} of every method option (None = not given)."""
        return {o.name: getattr(self, o.name) for o in methods.OPTIONS}

    def validate(self):
        def need(cond, msg):
            if not cond:
                raise ValueError(f"invalid option: {msg}")

        need(self.dataset in DATASET_CHOICES, f"--dataset must be one of {DATASET_CHOICES}, got {self.dataset!r}")
        need(self.dtype in DTYPES, f"--dtype must be one of {DTYPES}, got {self.dtype!r}")
        need(self.method in methods.METHODS, f"--method must be one of {list(methods.METHODS)}, got {self.method!r}")
        need(self.model is None or self.model in PRESETS, f"--model must be one of {sorted(PRESETS)}, got {self.model!r}")
        for name in ("epochs", "teacher_epochs", "batch_size", "image_size", "patch_size", "embed_dim", "depth",
                     "num_heads", "limit_per_class", "save_every", "log_every", "crop_padding",
                     "eval_batch_size", "eval_every", "max_steps", "accum_steps", "workers"):
            v = getattr(self, name)
            need(v is None or (isinstance(v, int) and v >= 1), f"--{name.replace('_', '-')} must be a positive integer, got {v!r}")
        for name in ("lr", "kd_temperature"):
            v = getattr(self, name)
            need(v is None or (math.isfinite(v) and v > 0), f"--{name.replace('_', '-')} must be positive, got {v!r}")
        for name in ("min_lr", "warmup_epochs", "weight_decay", "clip_grad", "grs_lambda", "grs_warmup_epochs"):
            v = getattr(self, name)
            need(v is None or (math.isfinite(v) and v >= 0), f"--{name.replace('_', '-')} must be >= 0, got {v!r}")
        need(0 <= self.label_smoothing < 1, f"--label-smoothing must be in [0, 1), got {self.label_smoothing}")
        need(self.kd_alpha is None or 0 <= self.kd_alpha <= 1, f"--kd-alpha must be in [0, 1], got {self.kd_alpha}")
        need(self.asm_momentum is None or 0 < self.asm_momentum <= 1,
             f"--asm-momentum must be in (0, 1], got {self.asm_momentum}")
        need(self.fraction is None or 0 < self.fraction <= 1, f"--fraction must be in (0, 1], got {self.fraction}")
        need(not (self.fraction and self.limit_per_class), "give --fraction or --limit-per-class, not both")
        for o in (o for o in methods.OPTIONS if o.choices is not None):
            v = getattr(self, o.name)
            need(v is None or v in o.choices, f"--{o.name.replace('_', '-')} must be one of {list(o.choices)}, got {v!r}")
        need(self.drop_path is None or 0 <= self.drop_path < 1, f"--drop-path must be in [0, 1), got {self.drop_path}")
        need(self.augment is None or self.augment in data.AUGMENT_MODES,
             f"--augment must be one of {list(data.AUGMENT_MODES)}, got {self.augment!r}")
        if self.dataset == "imagenet":
            need(self.augment is None and self.crop_padding is None, "--augment and --crop-padding do not apply to "
                 "--dataset imagenet: it has DeiT's augmentation, switched by --rand-augment, --mixup, --cutmix and "
                 "--random-erasing")
            need(self.data_dir is not None, "--dataset imagenet needs --data-dir: the ImageNet root (train/<wnid>/*.JPEG, "
                 "val/) or 'hub' (docs/imagenet.md)")
            need(not (self.fraction or self.limit_per_class), "--fraction and --limit-per-class do not apply to imagenet")
        else:
            given = [f"--{n.replace('_', '-')}" for n in IMAGENET_OPTIONS if getattr(self, n) is not None]
            need(not given, f"{', '.join(given)} apply to --dataset imagenet only")
        need(self.rand_augment is None or (isinstance(self.rand_augment, int) and self.rand_augment >= 0),
             f"--rand-augment must be an integer >= 0, got {self.rand_augment!r}")
        for name in ("mixup", "cutmix"):
            v = getattr(self, name)
            need(v is None or (math.isfinite(v) and v >= 0), f"--{name} must be >= 0, got {v!r}")
        need(self.random_erasing is None or 0 <= self.random_erasing <= 1,
             f"--random-erasing must be in [0, 1], got {self.random_erasing!r}")
        for name in ("teacher", "init_from"):
            path = getattr(self, name)
            need(path is None or os.path.isfile(path), f"--{name.replace('_', '-')} {path!r} is not a file")
        need(not (self.teacher and len(methods.get_method(self.method).stages) == 1), f"--teacher does not apply to "
             f"--method {self.method} (it has no stage that starts from or distils from a teacher); remove it")
        if self.stage_epochs is not None:
            parse_stage_epochs(self.stage_epochs)


def parse_stage_epochs(text):
    """'tervit_w8a8=2,tervit=4' -> {stage: epochs} (positive integers); ValueError naming the bad item."""
    out = {}
    for item in text.split(","):
        name, eq, value = item.strip().partition("=")
        if not (name and eq and value.isdigit() and int(value) >= 1):
            raise ValueError(f"invalid option: --stage-epochs {text!r}: {item!r} is not NAME=N with N a positive "
                             f"integer (e.g. --stage-epochs tervit_w8a8=2,tervit=4)")
        if name in out:
            raise ValueError(f"invalid option: --stage-epochs {text!r} names stage {name!r} twice")
        out[name] = int(value)
    return out


# Per-dataset defaults sized for a 2-core CPU.
DATASET_DEFAULTS = {
    "fashion-mnist": dict(model="fashion-mnist", epochs=5, batch_size=64, lr=2e-3, augment="flip"),
    "cifar10": dict(model="cifar", epochs=30, batch_size=128, lr=1e-3, augment="crop-flip"),
    "cifar100": dict(model="cifar", epochs=30, batch_size=128, lr=1e-3, augment="crop-flip"),
    "synthetic": dict(model="cifar", embed_dim=64, depth=2, num_heads=2, patch_size=8, epochs=8, batch_size=64, lr=2e-3,
                      augment="crop-flip"),
    "imagefolder": dict(model="cifar", epochs=30, batch_size=64, lr=1e-3, augment="crop-flip"),
    # DeiT-S's recipe (Touvron et al. 2021): batch 1024, lr 5e-4 * 1024 / 512, DeiT's augmentation
    "imagenet": dict(model="deit-small", image_size=224, epochs=300, batch_size=1024, lr=1e-3, rand_augment=2,
                     mixup=0.8, cutmix=1.0, random_erasing=0.25),
}


def resolve_config(cfg):
    """Validate, refuse method options that do not apply to cfg.method, and fill unset fields from the
    dataset defaults and the method options' defaults (grs_lambda stays None: its default is per stage,
    methods.grs_strength)."""
    cfg = dataclasses.replace(cfg)
    cfg.validate()
    methods.check_options(cfg.method, cfg.method_options())
    for k, v in DATASET_DEFAULTS.get(cfg.dataset, {}).items():
        if getattr(cfg, k) is None:
            setattr(cfg, k, v)
    for o in methods.OPTIONS:
        if getattr(cfg, o.name) is None:
            setattr(cfg, o.name, o.default)
    if cfg.crop_padding is not None and cfg.augment not in ("crop", "crop-flip"):
        raise ValueError(f"invalid option: --crop-padding applies to the random crop, but --augment is {cfg.augment!r}; "
                         f"remove --crop-padding or choose --augment crop or crop-flip")
    if cfg.out is None:
        cfg.out = os.path.join("runs", f"{cfg.dataset}-{cfg.method}")
    epochs_per_stage(cfg)  # refuses --stage-epochs naming a stage the run does not have
    return cfg


def recipe(cfg):
    """The stages of a resolved config's run (methods.recipe with --kd and --tervit-direct)."""
    return methods.recipe(cfg.method, cfg.kd, cfg.tervit_direct)


def epochs_per_stage(cfg, stages=None):
    """{stage: epochs} of a resolved config's run (methods.stage_epochs, the budget rule), over
    `stages` (default: recipe(cfg)); with --init-from the run trains the final stage alone, which
    then gets all of --epochs."""
    stages = stages or recipe(cfg)
    explicit = parse_stage_epochs(cfg.stage_epochs) if cfg.stage_epochs else None
    return methods.stage_epochs(stages[-1:] if cfg.init_from else stages, cfg.epochs, cfg.teacher_epochs, explicit)


def stage_sources(cfg, stages):
    """What each stage a run trains starts from and distils from: {stage: {"init": source, "teacher":
    source}}, a source None, {"stage": name} (that stage's best checkpoint) or {"checkpoint": path}.
    The first stage is the teacher; --teacher stands for it (it is then not trained), --init-from
    for the final stage's init (only the final stage is trained)."""
    first = stages[0].name if len(stages) > 1 else None
    given = {first: {"checkpoint": cfg.teacher}} if cfg.teacher and first else {}
    trained = stages[-1:] if cfg.init_from else [s for s in stages if s.name not in given]
    out = {}
    for s in trained:
        init = {"checkpoint": cfg.init_from} if cfg.init_from else \
            given.get(s.init, {"stage": s.init} if s.init else None)
        teacher = None if s.kd == "none" else given.get(first, {"stage": first})
        if teacher is not None and cfg.init_from and not cfg.teacher:
            raise ValueError(f"stage {s.name} distils ({s.kd}) from the {first} stage, which --init-from skips: "
                             f"give the teacher with --teacher CKPT, or train without distillation (--kd none)")
        out[s.name] = {"init": init, "teacher": teacher}
    return out


def model_config(cfg, distilled, num_classes, in_chans, image_size):
    fields = dict(PRESETS[cfg.model])
    for k in ("patch_size", "embed_dim", "depth", "num_heads", "mlp_ratio"):
        if getattr(cfg, k) is not None:
            fields[k] = getattr(cfg, k)
    fields.update(image_size=image_size, in_chans=in_chans, num_classes=num_classes, distilled=distilled,
                  drop_path_rate=cfg.drop_path or 0.0)
    if "embed_dim" in fields and fields["embed_dim"] % fields["num_heads"]:
        raise ValueError(f"invalid option: --embed-dim {fields['embed_dim']} is not divisible by --num-heads {fields['num_heads']}")
    return ViTConfig(**fields)


def quantizer_options(cfg):
    """The quantizer switches of a resolved config (stored in checkpoints as "scheme_options")."""
    return methods.QuantizerOptions(asm=cfg.asm, asm_center=cfg.asm_center, asm_momentum=cfg.asm_momentum,
                                    asm_where=cfg.asm_where, asm_scale=cfg.asm_scale,
                                    gsb_mode=cfg.gsb_mode, gsb_max_over=cfg.gsb_max_over,
                                    ternary_granularity=cfg.ternary_granularity)


def build_model(model_cfg, table, options, seed=0, dtype="float32"):
    """A ViT with fresh quantizers of quantizer table `table` (methods.TABLES)."""
    return ViT(model_cfg, quantizers=methods.build_quantizers(model_cfg, table, options=options, dtype=dtype),
               dtype=np.dtype(dtype), seed=seed)


# ---------------------------------------------------------------------------------------------
# checkpoints

def _state_tensors(model, opt):
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    opt_arrays, opt_meta = opt.state_dict()
    tensors.update({f"optim.{k}": v for k, v in opt_arrays.items()})
    return tensors, opt_meta


def save_training_state(path, model, opt, meta):
    tensors, opt_meta = _state_tensors(model, opt)
    checkpoint.save_checkpoint(path, tensors, {**meta, "optimizer": opt_meta})


def load_model(path, expect_config=None):
    """A ViT rebuilt from a minibvit training checkpoint (its config, method and weights)."""
    tensors, meta = checkpoint.load_checkpoint(path)
    if "model_config" not in meta or "scheme" not in meta:
        raise checkpoint.CheckpointError(f"{path} is a minibvit file but not a training checkpoint (no model_config)")
    model_cfg = ViTConfig.from_dict(meta["model_config"])
    if expect_config is not None and model_cfg != expect_config:
        raise ValueError(f"checkpoint {path} holds a model {model_cfg} but {expect_config} was requested")
    dtype = tensors["model.cls_token"].dtype.name if "model.cls_token" in tensors else "float32"
    model = build_model(model_cfg, meta["scheme"], methods.QuantizerOptions(**meta.get("scheme_options", {})), dtype=dtype)
    model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    return model, meta


def transfer_state(src, model):
    """Initialise ``model`` from another stage's state dict by name: shared names are copied (they
    must have equal shapes); quantizer parameters the source lacks stay uninitialised (NaN) and are
    set from the first batch; a distillation token and head the source lacks start as copies of the
    class token and head, and the position embedding gains the class token's row for the new token."""
    own = model.state_dict()
    src = dict(src)
    if "dist_token" in own and "dist_token" not in src:
        src["dist_token"] = src["cls_token"]
        src["head_dist.weight"], src["head_dist.bias"] = src["head.weight"], src["head.bias"]
        pos = src["pos_embed"]
        src["pos_embed"] = np.concatenate([pos[:, :1], pos[:, :1], pos[:, 1:]], axis=1)
    bad = [f"{k}: {np.shape(src[k])} vs {v.shape}" for k, v in own.items() if k in src and np.shape(src[k]) != v.shape]
    if bad:
        raise ValueError("the initial checkpoint does not fit the model (different model size?):\n  " + "\n  ".join(bad))
    for k, v in own.items():
        if k in src:
            v[...] = src[k]


# ---------------------------------------------------------------------------------------------
# one stage

class ImageNetSplit:
    """An ImageNet split as train_stage uses a data.Dataset (name, num_classes, class_names, mean, std,
    image_shape, len), its batches decoded in worker processes by imagenet.ImageNetData: DeiT's
    augmentation for "train" (each part a switch of cfg), resize + center crop for "val". close()
    stops the workers. source: an imagenet source (default: from cfg.data_dir, or the hub for 'hub')."""

    name = "imagenet"

    def __init__(self, cfg, split, source=None):
        from . import augment, imagenet

        if source is None:
            source = imagenet.hub_source(split) if cfg.data_dir == "hub" else imagenet.folder_source(cfg.data_dir, split)
        self.source, self.workers = source, cfg.workers
        self.class_names, self.num_classes = tuple(source.classes), len(source.classes)
        self.mean, self.std = np.asarray(augment.IMAGENET_MEAN), np.asarray(augment.IMAGENET_STD)
        self.image_shape = (cfg.image_size, cfg.image_size, 3)
        transform = batch_augment = None
        if split == "train":
            rand_augment = augment.RandAugmentConfig(num_ops=cfg.rand_augment) if cfg.rand_augment else None
            transform = augment.TrainTransform(size=cfg.image_size, rand_augment=rand_augment)
            # label smoothing goes into the soft targets when mixing (then the loss does not apply it again)
            batch_augment = augment.BatchAugment(num_classes=self.num_classes, erase_prob=cfg.random_erasing,
                                                 mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix,
                                                 smoothing=cfg.label_smoothing)
        self.data = imagenet.ImageNetData(source, train=split == "train", image_size=cfg.image_size,
                                          transform=transform, batch_augment=batch_augment, num_workers=cfg.workers)
        self._shard = None  # (batch size, rank, world, ImageNetData of this rank's evaluation batches)

    def __len__(self):
        return len(self.source)

    def eval_batches(self, batch_size, comm):
        """This rank's whole evaluation batches (distributed.owned_batches), decoded by a loader that
        reads only them."""
        if comm.world == 1:
            return self.data.batches(batch_size, 0, 0)
        if self._shard is None or self._shard[:3] != (batch_size, comm.rank, comm.world):
            if self._shard is not None:
                self._shard[3].close()
            from . import imagenet

            n = len(self)
            owned = distributed.owned_batches(data.steps_per_epoch(n, batch_size, drop_last=False), comm)
            rows = np.concatenate([np.arange(k * batch_size, min(n, (k + 1) * batch_size)) for k in owned] or
                                  [np.zeros(0, np.int64)])
            shard = imagenet.ImageNetData(SubsetSource(self.source, rows), train=False, image_size=self.image_shape[0],
                                          num_workers=self.workers) if len(rows) else None
            self._shard = (batch_size, comm.rank, comm.world, shard)
        shard = self._shard[3]
        return iter(()) if shard is None else shard.batches(batch_size, 0, 0)

    def close(self):
        self.data.close()
        if self._shard is not None and self._shard[3] is not None:
            self._shard[3].close()
        self._shard = None


class SubsetSource:
    """The samples `indices` of an imagenet source, in that order (picklable, for the loader's workers)."""

    def __init__(self, source, indices):
        self.source, self.indices = source, np.asarray(indices, np.int64)
        self.labels, self.classes = np.asarray(source.labels)[self.indices], source.classes

    def __len__(self):
        return len(self.indices)

    def open(self, i):
        return self.source.open(int(self.indices[i]))

    def describe(self, i):
        return self.source.describe(int(self.indices[i]))


def train_batches(dataset, cfg, epoch, start_step, drop_last, part=None):
    """The training batches (x, targets) of `epoch` from step start_step, a function of (seed, epoch,
    step) only; targets are int64 labels, or float32 (B, classes) soft targets under mixup/cutmix.
    part=(lo, hi): only those rows of every global batch (ImageNet decodes only them; mixup then pairs
    images within the part, as DeiT on several GPUs)."""
    if isinstance(dataset, ImageNetSplit):
        return dataset.data.batches(cfg.batch_size, cfg.seed, epoch, start_step, drop_last, part)
    batches = data.iterate_batches(dataset, cfg.batch_size, cfg.seed, epoch, start_step=start_step, drop_last=drop_last,
                                   augment=cfg.augment, padding=cfg.crop_padding, erase_prob=cfg.random_erasing or 0.0)
    return batches if part is None else ((x[part[0]:part[1]], y[part[0]:part[1]]) for x, y in batches)


def eval_batches(dataset, batch_size, comm):
    """This rank's whole evaluation batches (x, int labels), in order (all of them in one process)."""
    if isinstance(dataset, ImageNetSplit):
        yield from dataset.eval_batches(batch_size, comm)
        return
    owned = distributed.owned_batches(data.steps_per_epoch(len(dataset), batch_size, drop_last=False), comm)
    batches = data.iterate_batches(dataset, batch_size, seed=0, epoch=0, train=False, augment=False)
    for k, batch in enumerate(batches):
        if k in owned:
            yield batch


def hard_labels(targets):
    """Integer labels of a batch's targets (the most likely class of soft targets)."""
    return targets.argmax(axis=1) if targets.ndim == 2 else targets


class TrainingDiverged(RuntimeError):
    pass


class Stopped(Exception):
    pass


def evaluate(model, dataset, batch_size, predicted_classes=None, comm=None):
    """Top-1 accuracy (and mean loss) of a model on a dataset split, in evaluation mode.

    predicted_classes: an optional set that receives every class the model predicted (one class
    for every image is the sign of a dead model, warned about by train_stage).
    comm: with several ranks each evaluates whole batches (distributed.owned_batches; no batch is
    split, so batch statistics are those of one process) and the counts are summed."""
    comm = comm or distributed.SingleProcess()
    correct, total, loss_sum = 0, 0, 0.0
    predicted = np.zeros(dataset.num_classes)
    for x, y in eval_batches(dataset, batch_size, comm):
        logits, _ = model.forward(x, training=False)
        loss, _ = ops.cross_entropy_forward(logits, y)
        loss_sum += float(loss) * len(y)
        pred = logits.argmax(axis=1)
        correct += int((pred == y).sum())
        total += len(y)
        predicted[pred] = 1
    correct, loss_sum, total = comm.sum(np.array([correct, loss_sum, total], np.float64))
    if predicted_classes is not None:
        predicted_classes.update(np.flatnonzero(comm.sum(predicted)).tolist())
    return float(correct / total), float(loss_sum / total)


def _cross_entropy(logits, targets, label_smoothing):
    """(loss, backward(dloss) -> dlogits) against int labels (with label smoothing) or soft targets
    (mixup/cutmix: the smoothing is already in them, ops.soft_target_cross_entropy_*)."""
    if targets.ndim == 2:
        loss, cache = ops.soft_target_cross_entropy_forward(logits, targets)
        return loss, lambda dloss: ops.soft_target_cross_entropy_backward(dloss, cache)
    loss, cache = ops.cross_entropy_forward(logits, targets, label_smoothing)
    return loss, lambda dloss: ops.cross_entropy_backward(dloss, cache)


def _loss(stage, cfg, logits, y, teacher_logits):
    """Stage loss and d loss / d logits (same structure as logits); y: int labels or soft targets."""
    if stage.kd == "hard":  # DeiT: 0.5 CE(cls head, y) + 0.5 CE(dist head, argmax teacher)
        teacher_labels = teacher_logits.argmax(axis=1)
        if stage.distilled:
            l1, b1 = _cross_entropy(logits[0], y, cfg.label_smoothing)
            l2, b2 = _cross_entropy(logits[1], teacher_labels, 0.0)
            return 0.5 * (l1 + l2), (b1(0.5), b2(0.5))
        l1, b1 = _cross_entropy(logits, y, cfg.label_smoothing)  # no distillation token: both through the head
        l2, b2 = _cross_entropy(logits, teacher_labels, 0.0)
        return 0.5 * (l1 + l2), b1(0.5) + b2(0.5)
    if stage.distilled:  # no teacher: both heads learn the labels
        l1, b1 = _cross_entropy(logits[0], y, cfg.label_smoothing)
        l2, b2 = _cross_entropy(logits[1], y, cfg.label_smoothing)
        return 0.5 * (l1 + l2), (b1(0.5), b2(0.5))
    ce, back = _cross_entropy(logits, y, cfg.label_smoothing)
    if stage.kd == "soft":
        kd, ck = ops.kd_soft_forward(logits, teacher_logits, cfg.kd_temperature)
        a = cfg.kd_alpha
        return (1 - a) * ce + a * kd, back(1 - a) + ops.kd_soft_backward(a, ck)
    return ce, back(1.0)


@contextlib.contextmanager
def quiet_floating_point():
    """Silence NumPy's floating-point RuntimeWarnings (overflow, invalid value, divide by zero), also
    those of the kernels' worker threads: a diverging run is reported once, by the loss check of the
    next step, not by a screen of warnings before it."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", r"(overflow|invalid value|divide by zero) encountered", RuntimeWarning)
        yield


def train_step(model, opt, x, y, *, lr, rng, loss_fn, teacher=None, hooks=(), step=0, clip_grad=None,
               parts=None, reducer=None, first_row=0):
    """One optimizer step: forward, teacher, loss, backward, gradient hooks (GRS), clip, AdamW.

    loss_fn(logits, y, teacher_logits) -> (loss, dlogits); hooks: callables hook(model, step) that
    edit model.grads after backward (methods.gradient_hooks). Raises TrainingDiverged on a non-finite
    loss before touching the weights (NumPy's floating-point warnings are silenced: quiet_floating_point).
    Returns (loss, logits, gradient norm before clipping).

    Data-parallel and/or accumulated (docs/scaling.md): parts = distributed.batch_slices(global batch,
    rank, world, accum_steps), reducer = the distributed.GradientReducer, x and y this rank's rows of
    the global batch, x[0] being its row `first_row`, and rng(micro) -> the Generator of micro-step
    `micro`. Each part runs forward (with the quantizer state made global over the ranks), teacher,
    loss and a backward whose gradients the reducer sums, weighted, over micro-steps and ranks while
    the backward runs; GRS, clipping and AdamW then act on the summed gradient, the same on every
    rank. Returns this rank's share sum(weight * part loss) of the global mean loss and the logits of
    its rows, in the parts' order.
    """
    with quiet_floating_point():
        if parts is None:
            logits, cache = model.forward(x, training=True, rng=rng)
            teacher_logits = teacher.forward(x, training=False)[0] if teacher is not None else None
            loss, dlogits = loss_fn(logits, y, teacher_logits)
            if not np.isfinite(loss):
                raise TrainingDiverged(f"the loss became {loss}")
            model.backward(dlogits, cache)
        else:
            comm = reducer.comm
            loss, pieces = 0.0, []
            for micro, part in enumerate(parts):
                rows = slice(part.slice.start - first_row, part.slice.stop - first_row)
                xs, ys = x[rows], y[rows]
                with distributed.global_quantizer_state(model, comm) if comm.world > 1 else contextlib.nullcontext():
                    logits, cache = model.forward(xs, training=True, rng=rng(micro))
                teacher_logits = teacher.forward(xs, training=False)[0] if teacher is not None else None
                part_loss, dlogits = loss_fn(logits, ys, teacher_logits)
                if not np.isfinite(part_loss):
                    raise TrainingDiverged(f"the loss became {part_loss} (rank {comm.rank}, micro-step {micro})")
                reducer.begin(part)
                model.backward(dlogits, cache, on_grads_ready=reducer.hook(model))
                grads = reducer.finish()
                loss += part.weight * float(part_loss)
                pieces.append(logits)
            model.grads = grads
            logits = (tuple(np.concatenate(heads) for heads in zip(*pieces)) if isinstance(pieces[0], tuple)
                      else np.concatenate(pieces))
        for hook in hooks:
            hook(model, step)
        gnorm = clip_grad_norm(model.grads, clip_grad or None)
        opt.step(model.grads, lr=lr)
    return loss, logits, gnorm


def make_run_dir(path):
    """Create the run directory `path` (and its parents), or refuse clearly (an existing file there)."""
    for at in (path, os.path.dirname(path)):
        if at and os.path.exists(at) and not os.path.isdir(at):
            raise ValueError(f"--out: {at} is an existing file, not a directory; choose a directory path "
                             f"(nothing was written)")
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise ValueError(f"--out: cannot create the run directory {path}: {e.strerror}") from None


def _steps_done(record, steps):
    """How many steps of the stage had run when a log.jsonl record was written (epoch records after
    the epoch's last step, step and warning records after their step)."""
    if "train_loss" in record:
        return (record["epoch"] + 1) * steps
    return record["epoch"] * steps + record["step"] + 1


def truncate_log(path, steps, position):
    """Keep the records of log.jsonl written at or before `position` (steps done, as in the checkpoint
    the run resumes from; 0 for a fresh start), drop the rest and any line a kill cut short. The
    resumed run writes the dropped records again, so every record appears once."""
    if not os.path.exists(path):
        return
    kept = []
    with open(path) as f:
        for line in f:
            try:
                keep = line.endswith("\n") and _steps_done(json.loads(line), steps) <= position
            except (ValueError, TypeError, KeyError):  # a line cut short by a kill, or not a record
                continue
            if keep:
                kept.append(line)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.writelines(kept)
    os.replace(tmp, path)


def _warn(log, stage, epoch, step, text):
    """A warning on stderr and as a {"stage", "epoch", "step", "warning"} record of log.jsonl."""
    print(f"[{stage.name}] warning: {text}", file=sys.stderr)
    log.write(json.dumps({"stage": stage.name, "epoch": epoch, "step": step, "warning": text}) + "\n")


def _warm_up_loss(logits, y, teacher_logits):
    """The warm-up step's loss: the cross-entropy of every head (it runs the kernels the stage loss
    runs, without calling the stage loss itself)."""
    heads = logits if isinstance(logits, tuple) else (logits,)
    caches = [ops.cross_entropy_forward(h, y)[1] for h in heads]
    grads = tuple(ops.cross_entropy_backward(1.0, c) for c in caches)
    return 0.0, grads if isinstance(logits, tuple) else grads[0]


def _warm_up(model, cfg, stage, x, y, teacher, steps):
    """Compile (Numba) everything a training step and an evaluation forward run, on a throwaway copy
    of the model with its own optimizer and hooks, so the compile time stays out of the epoch's time
    and images/s. The model, its optimizer and every RNG stream are untouched. Returns seconds."""
    t0 = time.perf_counter()
    scratch = copy.deepcopy(model)
    opt = AdamW(scratch.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    hooks = methods.gradient_hooks(stage, scratch.quantizers, **methods.grs_settings(cfg, steps, cfg.epochs))
    try:
        train_step(scratch, opt, x, y, lr=cfg.lr, rng=np.random.default_rng(0), loss_fn=_warm_up_loss, teacher=teacher,
                   hooks=hooks, step=0, clip_grad=cfg.clip_grad)
    except TrainingDiverged:
        pass  # the real step reports it
    with quiet_floating_point():
        scratch.forward(x, training=False)
    return time.perf_counter() - t0


def train_stage(cfg, stage, out_dir, train_set, test_set, init_state=None, teacher=None):
    """Train one stage into out_dir; returns (best checkpoint path, best accuracy).

    With several MPI ranks (distributed.init) every rank runs this with the same arguments: each
    computes its slice of every global batch, rank 0 alone logs, prints and writes the checkpoints
    (every rank passes a barrier after each), and one small allreduce per step sums the loss, the
    correct predictions and the Ctrl-C flag (docs/scaling.md)."""
    comm = distributed.current()
    main_rank = comm.is_main
    if main_rank:
        make_run_dir(out_dir)
    last_path, best_path = os.path.join(out_dir, "last.safetensors"), os.path.join(out_dir, "best.safetensors")
    stages = recipe(cfg)
    if stage not in stages:  # a stage trained on its own (tests, tutorials): the rule over it alone
        stages = (stage,)
    all_epochs = epochs_per_stage(cfg, stages)
    epochs = all_epochs[stage.name]
    sources = stage_sources(cfg, stages).get(stage.name) or {
        "init": None if init_state is None else "given by the caller",
        "teacher": None if teacher is None else "given by the caller"}
    height, _, channels = train_set.image_shape if isinstance(train_set, ImageNetSplit) else train_set.images.shape[1:]
    model_cfg = model_config(cfg, stage.distilled, train_set.num_classes, channels, height)
    options = quantizer_options(cfg)
    model = build_model(model_cfg, stage.table, options, seed=cfg.seed, dtype=cfg.dtype)
    opt = AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    drop_last = len(train_set) >= cfg.batch_size
    steps = data.steps_per_epoch(len(train_set), cfg.batch_size, drop_last=drop_last)
    total_steps = epochs * steps
    warmup = int(round(cfg.warmup_epochs * steps))
    binarized = methods.binarized_weight_roles(model.quantizers)
    ternary = methods.ternary_weight_roles(model.quantizers)
    hooks = methods.gradient_hooks(stage, model.quantizers, **methods.grs_settings(cfg, steps, epochs))
    meta = {"kind": "minibvit-train", "model_config": model_cfg.to_dict(), "scheme": stage.table,
            "scheme_options": dataclasses.asdict(options), "stage": stage.name, "method": cfg.method,
            "gradient_hooks": [repr(h) for h in hooks], "kd": stage.kd, "distilled": stage.distilled,
            "init": sources["init"], "teacher": sources["teacher"], "stage_epochs": all_epochs,
            "train_config": dataclasses.asdict(cfg),
            "dataset": {"name": train_set.name, "mean": train_set.mean.tolist(), "std": train_set.std.tolist(),
                        "class_names": list(train_set.class_names),
                        **({"wnids": list(train_set.class_names)} if isinstance(train_set, ImageNetSplit) else {})},
            "rng": "dropout/drop-path of global step t use numpy default_rng([seed, 7, t]), or [seed, 7, t, micro-step, "
                   "rank] with several ranks or --accum-steps; batches use (seed, epoch, step)"}
    epoch, start_step, best_acc = 0, 0, -1.0
    sums = {"seen": 0, "correct": 0, "loss_sum": 0.0}  # the current epoch's running sums
    if os.path.exists(last_path):
        tensors, saved = checkpoint.load_checkpoint(last_path)
        if saved.get("model_config") != meta["model_config"] or saved.get("scheme") != stage.table:
            raise ValueError(f"{out_dir} holds a run of a different model or method than requested; "
                             f"choose another --out (nothing was overwritten)")
        if saved.get("complete"):
            _say(comm, f"[{stage.name}] reusing the finished stage in {out_dir} (test acc {saved['best_acc']:.4f})")
            return best_path, saved["best_acc"]
        if not cfg.resume:
            raise ValueError(f"{out_dir} holds an unfinished run; pass --resume to continue it or choose another "
                             f"--out (nothing was overwritten)")
        model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
        opt.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("optim.")}, saved["optimizer"])
        epoch, start_step, best_acc = saved["epoch"], saved["step"], saved["best_acc"]
        sums = saved.get("epoch_sums", sums)
        _say(comm, f"[{stage.name}] resuming at epoch {epoch} step {start_step}")
    elif init_state is not None:
        transfer_state(init_state, model)

    data_parallel = comm.world > 1 or cfg.accum_steps > 1
    reducer = None
    if data_parallel:  # rank 0's state everywhere (also a resumed or initialised one), then check it
        state = _state_tensors(model, opt)[0]
        distributed.broadcast_state(state, comm)
        distributed.check_replicas(state, comm)
        reducer = distributed.GradientReducer(model.parameters(), comm)
    # ImageNet on several ranks without accumulation: each rank decodes only its rows of every batch
    decode_part = isinstance(train_set, ImageNetSplit) and comm.world > 1 and cfg.accum_steps == 1 and drop_last
    part_rows = None
    if decode_part:
        (own,) = distributed.batch_slices(cfg.batch_size, comm.rank, comm.world, 1)
        part_rows = (own.slice.start, own.slice.stop)

    if main_rank:
        with open(os.path.join(out_dir, "config.json"), "w") as f:
            json.dump({k: v for k, v in meta.items() if k != "rng"}, f, indent=2)

    interrupted = {"flag": False}

    def on_sigint(signum, frame):
        interrupted["flag"] = True

    old_handler = signal.signal(signal.SIGINT, on_sigint)
    log_path = os.path.join(out_dir, "log.jsonl")
    if main_rank:
        truncate_log(log_path, steps, epoch * steps + start_step)
    log = open(log_path if main_rank else os.devnull, "a")
    flip_counter, ternary_counter = diagnostics.FlipCounter(), diagnostics.FlipCounter()
    done_steps = 0

    def loss_fn(logits, y, teacher_logits):
        return _loss(stage, cfg, logits, y, teacher_logits)

    def save_state(path, state_meta):
        """Rank 0 writes (atomically), after a check that the replicas agree; every rank waits for it."""
        if comm.world > 1:
            distributed.check_replicas(_state_tensors(model, opt)[0], comm)
        if main_rank:
            save_training_state(path, model, opt, state_meta)
        comm.barrier()

    def save_last(next_epoch, next_step, **extra):
        log.flush()  # the log holds every step the checkpoint holds
        save_state(last_path, {**meta, "epoch": next_epoch, "step": next_step, "best_acc": best_acc, **extra})

    def dropout_rng(gstep):
        if not data_parallel:
            return np.random.default_rng([cfg.seed, 7, gstep])
        return lambda micro: np.random.default_rng([cfg.seed, 7, gstep, micro, comm.rank])

    try:
        from tqdm import tqdm

        warmup_s = None
        if epoch < epochs:
            x, y = next(iter(train_batches(train_set, cfg, epoch, start_step, drop_last, part_rows)))
            if data_parallel:  # one micro-step's rows
                rows = -(-len(y) // (cfg.accum_steps * (1 if decode_part else comm.world)))
                x, y = x[:rows], y[:rows]
            warmup_s = _warm_up(model, cfg, stage, x, hard_labels(y), teacher, steps)
        while epoch < epochs:
            bar = tqdm(total=steps, initial=start_step, desc=f"{stage.name} {epoch + 1}/{epochs}", file=sys.stderr,
                       disable=None if main_rank else True, leave=False)
            t0, timed = time.perf_counter(), 0
            seen, correct, loss_sum = sums["seen"], sums["correct"], sums["loss_sum"]
            last_step = start_step - 1
            batches = train_batches(train_set, cfg, epoch, start_step, drop_last, part_rows)
            for step, (x, y) in enumerate(batches, start=start_step):
                gstep, last_step = epoch * steps + step, step
                lr = cosine_lr(gstep, total_steps, cfg.lr, warmup, cfg.min_lr)
                batch_rows = cfg.batch_size if decode_part else len(y)  # the global batch
                first_row = part_rows[0] if decode_part else 0
                parts = distributed.batch_slices(batch_rows, comm.rank, comm.world, cfg.accum_steps) if data_parallel else None
                try:
                    loss, logits, gnorm = train_step(model, opt, x, y, lr=lr, rng=dropout_rng(gstep), loss_fn=loss_fn,
                                                     teacher=teacher, hooks=hooks, step=gstep, clip_grad=cfg.clip_grad,
                                                     parts=parts, reducer=reducer, first_row=first_row)
                except TrainingDiverged as e:
                    kept = (f"The last good checkpoint is kept: {last_path}" if os.path.exists(last_path)
                            else "No checkpoint had been saved yet.")
                    raise TrainingDiverged(f"[{stage.name}] {e} at epoch {epoch} step {step}; lower --lr or raise "
                                           f"--clip-grad. {kept}") from None
                pred = (logits[0] + logits[1]) / 2 if isinstance(logits, tuple) else logits
                labels = hard_labels(y if parts is None else np.concatenate(
                    [y[p.slice.start - first_row:p.slice.stop - first_row] for p in parts]))
                # the step's global loss, correct predictions and Ctrl-C flag (identities in one process)
                loss, step_correct, stop = comm.sum(np.array([float(loss), int((pred.argmax(1) == labels).sum()),
                                                              float(interrupted["flag"])]))
                interrupted["flag"] = bool(stop)
                correct += int(step_correct)
                seen += batch_rows
                timed += batch_rows
                loss_sum += float(loss) * batch_rows
                record = {"stage": stage.name, "epoch": epoch, "step": step, "global_step": gstep, "lr": lr,
                          "loss": float(loss), "grad_norm": gnorm}
                dead = []
                if main_rank:  # diagnostics: the weights are global, the activations those of rank 0's rows
                    flip_counter.update(model, binarized)
                    ternary_counter.update(model, ternary)
                    with quiet_floating_point():  # diverged weights: the next step's loss check reports it
                        if gstep % cfg.log_every == 0:
                            record.update(diagnostics.weight_diagnostics(model, binarized, flip_counter))
                            record.update(diagnostics.ternary_diagnostics(model, ternary, ternary_counter))
                            record.update(diagnostics.activation_diagnostics(model, x[: min(len(x), 32)]))
                        # the scales are set now: a quantizer that passes nothing on kills the model
                        dead = diagnostics.dead_activation_quantizers(model, x[: min(len(x), 32)]) if gstep == 0 else []
                log.write(json.dumps(record) + "\n")
                if dead:
                    _warn(log, stage, epoch, step, "after the first step, " + "; ".join(
                        f"{role}: {what}" for role, what in dead) + ". The layers after them see no image "
                        "(a near-uniform attention binarizes to all zeros, e.g. from a weak teacher)")
                elapsed = time.perf_counter() - t0
                bar.set_postfix(loss=f"{loss_sum / seen:.3f}", acc=f"{correct / seen:.3f}", img_s=f"{timed / elapsed:.0f}")
                bar.update(1)
                done_steps += 1
                epoch_sums = {"seen": seen, "correct": correct, "loss_sum": loss_sum}
                if (step + 1) % cfg.save_every == 0 and step + 1 < steps:
                    save_last(epoch, step + 1, epoch_sums=epoch_sums)
                if interrupted["flag"]:
                    save_last(epoch, step + 1, epoch_sums=epoch_sums)
                    raise Stopped(f"[{stage.name}] interrupted: saved {last_path}; continue with --resume")
                if cfg.max_steps and done_steps >= cfg.max_steps:
                    break
            bar.close()
            train_time = time.perf_counter() - t0
            predicted = set()
            stop_now = bool(cfg.max_steps and done_steps >= cfg.max_steps)
            evaluated = (epoch + 1) % cfg.eval_every == 0 or epoch + 1 >= epochs or stop_now
            acc, test_loss = evaluate(model, test_set, cfg.eval_batch_size, predicted, comm) if evaluated else (None, None)
            record = {"stage": stage.name, "epoch": epoch, "train_loss": loss_sum / max(seen, 1),
                      "train_acc": correct / max(seen, 1), **({"test_loss": test_loss, "test_acc": acc} if evaluated else {}),
                      "epoch_time_s": train_time, "images_per_s": timed / max(train_time, 1e-9)}
            if main_rank:  # the ternary codes' change rate over the epoch and their zero mass at its end
                with quiet_floating_point():
                    record.update(diagnostics.ternary_diagnostics(model, ternary, ternary_counter, epoch=True))
            compiled = ""
            if warmup_s is not None:  # the first epoch of this process: compile time kept apart
                record["warmup_s"] = warmup_s
                compiled = f" (+{warmup_s:.1f}s compile/warm-up, not counted)"
                warmup_s = None
            log.write(json.dumps(record) + "\n")
            _say(comm, f"[{stage.name}] epoch {epoch + 1}/{epochs}: train loss {record['train_loss']:.4f} acc "
                 f"{record['train_acc']:.4f} | test acc {'-' if acc is None else f'{acc:.4f}'} | {train_time:.0f}s, "
                 f"{record['images_per_s']:.0f} "
                 f"img/s{compiled}")
            if len(predicted) == 1 and test_set.num_classes > 1 and main_rank:
                (only,) = predicted
                _warn(log, stage, epoch, last_step, f"every test image was predicted as class {only} "
                      f"({test_set.class_names[only]}): the output does not depend on the image")
            log.flush()
            epoch, start_step = epoch + 1, 0
            sums = {"seen": 0, "correct": 0, "loss_sum": 0.0}
            if evaluated and acc > best_acc:
                best_acc = acc
                save_state(best_path, {**meta, "epoch": epoch, "step": 0, "best_acc": best_acc, "complete": True})
            save_last(epoch, 0, complete=epoch >= epochs or stop_now)
            if stop_now:
                break
    finally:
        log.close()
        signal.signal(signal.SIGINT, old_handler)
        for split in (train_set, test_set):  # stop ImageNet's decoding workers
            if isinstance(split, ImageNetSplit):
                split.close()
    if main_rank:
        _plot(out_dir, model, binarized)
    return best_path, best_acc


def _say(comm, text):
    """Print a progress line on stderr, from rank 0 only."""
    if comm.is_main:
        print(text, file=sys.stderr)


def _plot(out_dir, model, binarized):
    """curves.png (loss and accuracy) and weights.png (latent-weight histograms); needs matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plots (pip install 'minibvit[plot]')", file=sys.stderr)
        return
    records = [json.loads(line) for line in open(os.path.join(out_dir, "log.jsonl"))]
    steps = [r for r in records if "loss" in r]
    epochs = [r for r in records if "test_acc" in r]
    fig, ax = plt.subplots(1, 2, figsize=(10, 3.5))
    ax[0].plot([r["global_step"] for r in steps], [r["loss"] for r in steps], lw=0.7)
    ax[0].set(xlabel="step", ylabel="training loss")
    ax[1].plot([r["epoch"] + 1 for r in epochs], [r["test_acc"] for r in epochs], "o-", label="test")
    ax[1].plot([r["epoch"] + 1 for r in epochs], [r["train_acc"] for r in epochs], "s--", label="train")
    ax[1].set(xlabel="epoch", ylabel="accuracy")
    ax[1].legend()
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "curves.png"), dpi=100)
    plt.close(fig)
    if binarized:
        fig, ax = plt.subplots(figsize=(5, 3.5))
        w = np.concatenate([(model.params[r] / np.abs(model.params[r]).mean(axis=1, keepdims=True)).ravel() for r in binarized])
        ax.hist(w, bins=121, range=(-4, 4))
        ax.set(xlabel="latent weight / per-channel mean|W|", ylabel="count", title="binarized latent weights")
        fig.tight_layout()
        fig.savefig(os.path.join(out_dir, "weights.png"), dpi=100)
        plt.close(fig)


# ---------------------------------------------------------------------------------------------
# the whole recipe

def load_data(cfg):
    """(train split, test split): in memory (minibvit.data), or ImageNet's train and val (ImageNetSplit)."""
    if cfg.dataset == "imagenet":
        return ImageNetSplit(cfg, "train"), ImageNetSplit(cfg, "val")
    kw = dict(data_dir=cfg.data_dir, image_size=cfg.image_size)
    train_set = data.load_dataset(cfg.dataset, "train", limit_per_class=cfg.limit_per_class, fraction=cfg.fraction,
                                  seed=cfg.seed, **kw)
    test_set = data.load_dataset(cfg.dataset, "test", **kw)
    return train_set, test_set


def run(cfg):
    """Run the whole recipe of cfg.method; returns {stage: (best checkpoint, best accuracy)}."""
    cfg = resolve_config(cfg)
    comm = distributed.init()  # SingleProcess, or MPI under mpiexec / srun
    if comm.is_main:
        make_run_dir(cfg.out)
    train_set, test_set = load_data(cfg)
    try:
        return _run_stages(cfg, train_set, test_set)
    finally:
        for split in (train_set, test_set):
            if isinstance(split, ImageNetSplit):
                split.close()


def _run_stages(cfg, train_set, test_set):
    stages = recipe(cfg)
    epochs = epochs_per_stage(cfg, stages)
    quantized = [s.name for s in stages if not s.first and s.name in epochs]
    if quantized and sum(epochs[n] for n in quantized) > cfg.epochs and not cfg.stage_epochs:
        _say(distributed.current(), f"note: --epochs {cfg.epochs} cannot be split over the {len(quantized)} quantized "
             f"stages ({', '.join(quantized)}): each trains 1 epoch; give --epochs >= {len(quantized)} or --stage-epochs")
    if cfg.teacher:
        given, _ = load_model(cfg.teacher)
        if given.cfg.num_classes != train_set.num_classes:
            raise ValueError(f"--teacher has {given.cfg.num_classes} classes, the dataset {train_set.num_classes}")
    results, loaded = {}, {}

    def checkpoint_of(source):
        return source.get("checkpoint") or results[source["stage"]][0]

    def model_of(source):  # each checkpoint loaded once
        path = checkpoint_of(source)
        if path not in loaded:
            loaded[path] = load_model(path)[0]
        return loaded[path]

    by_name = {s.name: s for s in stages}
    for name, source in stage_sources(cfg, stages).items():
        stage = by_name[name]
        init_state = model_of(source["init"]).state_dict() if source["init"] else None
        teacher = model_of(source["teacher"]) if source["teacher"] else None
        out_dir = os.path.join(cfg.out, stage.name)
        results[stage.name] = train_stage(cfg, stage, out_dir, train_set, test_set, init_state, teacher)
    return results


def _parser():
    ap = argparse.ArgumentParser(prog="python -m minibvit.train", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    groups = {name: ap.add_argument_group(name) for name in GROUPS}
    for f in dataclasses.fields(TrainConfig):
        name, meta = "--" + f.name.replace("_", "-"), f.metadata
        group = groups[meta["group"]]
        if f.type is bool:  # a method option's default None means "not given" (methods.check_options)
            shown = f" (default: {meta['shown']})" if f.default is None else ""
            group.add_argument(name, action="store_true", default=f.default, help=meta["help"] + shown)
            continue
        option = methods.OPTION_BY_NAME.get(f.name)
        choices = option.choices if option is not None else meta.get("choices")
        metavar = "{" + ",".join(choices) + "}" if choices else f.type.__name__.upper()
        group.add_argument(name, type=f.type, default=f.default, metavar=metavar,
                           help=f"{meta['help']} (default: {meta['shown']})")
    return ap


def main(argv=None):
    args = _parser().parse_args(argv)
    cfg = TrainConfig(**vars(args))
    comm = distributed.init()
    try:
        results = run(cfg)
    except (ValueError, checkpoint.CheckpointError, TrainingDiverged, LoaderError) as e:
        if comm.world > 1:  # a rank that returned would leave the others waiting: end the job
            comm.abort(f"[rank {comm.rank}/{comm.world}] error: {e}", 2)
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Stopped as e:  # every rank stops at the same step (the flag is summed every step)
        if comm.is_main:
            print(str(e), file=sys.stderr)
        return 130
    if not comm.is_main:
        return 0
    for stage, (path, acc) in results.items():
        print(f"{stage}: best test accuracy {acc:.4f}  ({path})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
