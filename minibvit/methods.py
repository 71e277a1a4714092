"""The method registry: a method is data, and this file holds all of it.

A method (fp, binary, binaryvit, tervit, gsb) is a `Method` record: its stages, each a `Stage`
(name, quantizer table, the stage it starts from, its distillation kind, whether the model has a
distillation token, its gradient hooks), and the options that apply to it. A quantizer table
(`QuantizerTable`) maps tensor-role patterns to quantizer specs and says whether and how the packed
engine can export it (`packed`). The trainer (train.py) and the cost model (cost.py) read these
records and compare no method names; the packed engine is to read `packed` instead of comparing table
names (today minibvit/engine.py still keeps its own EXPORTABLE_SCHEMES). The math of every paper lives in its
own file: binaryvit.py (GRS, ASM), gsb.py, tervit.py; quant.py holds the generic quantizers.

    method     stages (each initialised from the one before)                    distillation (default)
    fp         fp                                                               -
    binary     teacher (fp) -> binary                                           soft KD
    binaryvit  teacher (fp) -> binaryvit (binary + ASM, GRS hook)               soft KD
    tervit     fp -> tervit_w8a8 -> tervit (ternary weights, A8)                -
    gsb        teacher (fp) -> gsb_stage1 (binary MLP weights) -> gsb           DeiT hard (dist token)

A run trains ``recipe(method, kd, direct)``: these stages with --kd applied to every stage after the
first (whose full-precision model is the teacher of every distilled stage) and, with --tervit-direct,
the method's progressive stages left out. ``stage_epochs`` is the budget rule: --epochs is the total
of the quantized stages after the first, split evenly over them; --stage-epochs sets stages by name.

Tensor roles are

    patch_embed.proj.weight, patch_embed.proj.input
    blocks.<i>.attn.qkv.weight / .input, blocks.<i>.attn.proj.weight / .input,
    blocks.<i>.mlp.fc1.weight / .input, blocks.<i>.mlp.fc2.weight / .input,
    blocks.<i>.attn.q, blocks.<i>.attn.k   (before Q K^T)
    blocks.<i>.attn.attn                   (the softmax probabilities, before A V)
    blocks.<i>.attn.v                      (the values, before A V)
    head.weight / .input, head_dist.weight / .input

A table maps shell-style patterns (fnmatch: ``*`` also matches dots) to quantizer specs; for each role
the LAST matching pattern wins, so overrides are appended. Specs are the names of
``quant.QUANTIZER_SPECS`` plus ``asm:<spec>`` (binaryvit.ASM in front of an activation binarizer),
``gsb_attn`` and ``gsb_value`` (gsb.py). Roles that match no pattern, and the spec ``fp``, stay full
precision. LayerNorm, softmax, GELU and residual adds are full precision in every method.

Options (TrainConfig fields) that do not apply to a method are refused (check_options): GRS options
apply to every method with binarized weights (GRS composes with any binary method), ASM options to
methods with elastic activation binarizers (ASM composes with any binary method: --asm on), GSB
options to methods with GSB quantizers, soft-KD options to methods with a soft-distilled stage. GRS
is on by default only in stages that declare the hook (BinaryViT's); giving --grs-lambda turns it on
(or off, with 0) in every binarized stage of the method. ASM is on by default only where a table
declares it (asm:<spec>, BinaryViT's); --asm off removes it (the method without ASM, bit for bit),
--asm on puts it where --asm-where says; ASM's other switches are refused while ASM is off.
"""
from dataclasses import dataclass, replace
from fnmatch import fnmatchcase

from . import binaryvit, gsb, quant, tervit
from .quant import check_choice

PACKED_KINDS = (None, "binary", "ternary", "gsb")
"""How the packed engine exports a table: not at all, binary bit-planes, ternary planes, GSB bases."""
KD_KINDS = ("none", "soft", "hard")
"""Distillation of a stage from the teacher (the recipe's first, full-precision stage): none, soft (KL
to the teacher's logits), hard (DeiT's hard labels: through the distillation token where the stage's
model has one, else through the class head)."""
HOOKS = ("grs",)
"""Gradient hooks a stage may run after backward, before clipping: GRS (binaryvit.GRSHook)."""
EXTRA_SPECS = ("gsb_attn", "gsb_value")


# ------------------------------------------------------------------------------------------------
# records
# ------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class QuantizerTable:
    """A quantizer table: patterns -> specs, its packed export kind and its default gradient hooks."""

    name: str
    patterns: dict
    packed: str = None  # one of PACKED_KINDS
    hooks: tuple = ()  # gradient hooks on by default in a stage training this table
    summary: str = ""

    def __post_init__(self):
        check_choice(self.packed, PACKED_KINDS, f"table {self.name!r} packed")
        for hook in self.hooks:
            check_choice(hook, HOOKS, f"table {self.name!r} hook")
        for spec in self.patterns.values():
            check_spec(spec)

    def spec(self, role):
        """The spec of one role under this table ("fp" when no pattern matches)."""
        spec = "fp"
        for pattern, s in self.patterns.items():
            if fnmatchcase(role, pattern):
                spec = s
        return spec

    def specs(self):
        return set(self.patterns.values())


@dataclass(frozen=True)
class Stage:
    """One training stage: trains table `table` into <out>/<name>/.

    init: the stage whose best checkpoint initialises this one (None: fresh weights).
    kd: one of KD_KINDS, the method's default; distilled: the model has a distillation token and
    head (recipe keeps it only while the stage distils "hard").
    first: the full-precision first stage (the teacher; trained for --teacher-epochs).
    hooks: gradient hooks on by default (None: the table's).
    """

    name: str
    table: str
    init: str = None
    kd: str = "none"
    distilled: bool = False
    first: bool = False
    hooks: tuple = None

    def __post_init__(self):
        check_choice(self.kd, KD_KINDS, f"stage {self.name!r} kd")
        if self.table not in TABLES:
            raise ValueError(f"stage {self.name!r}: unknown quantizer table {self.table!r}; "
                             f"choose one of {sorted(TABLES)}")
        if self.hooks is None:
            object.__setattr__(self, "hooks", TABLES[self.table].hooks)

    @property
    def quantizer_table(self):
        return TABLES[self.table]


@dataclass(frozen=True)
class Option:
    """A method option (a TrainConfig field): default, allowed values, which group decides where it
    applies ("grs", "asm", "gsb", "kd_soft"), and its help text."""

    name: str
    group: str
    default: object
    help: str
    choices: tuple = None
    shown: str = None  # the default as --help shows it, when `default` alone does not say it

    @property
    def shown_default(self):
        return self.shown if self.shown is not None else self.default


@dataclass(frozen=True)
class Method:
    """A method: its stages (in training order) and summary; options, hooks and precision follow.
    progressive: the intermediate stages a direct run (--tervit-direct) leaves out."""

    name: str
    stages: tuple
    summary: str = ""
    progressive: tuple = ()

    def __post_init__(self):
        names = [s.name for s in self.stages]
        if any(s.first for s in self.stages[1:]):
            raise ValueError(f"method {self.name!r}: only its first stage may be marked first")
        bad = [n for n in self.progressive if n not in names[1:-1]]
        if bad:
            raise ValueError(f"method {self.name!r}: progressive stages {bad} are not intermediate stages of {names}")

    @property
    def final(self):
        return self.stages[-1]

    @property
    def tables(self):
        return [s.quantizer_table for s in self.stages]

    @property
    def distillation(self):
        return self.final.kd

    @property
    def hooks(self):
        return tuple(sorted({h for s in self.stages for h in s.hooks}))

    @property
    def packed(self):
        """How the final stage exports (None: it cannot be packed)."""
        return self.final.quantizer_table.packed

    def option_groups(self):
        """The option groups that apply to this method under some setting of its switches (--kd
        soft makes the soft-KD options apply to every method with a teacher; check_options
        refines this with the run's recipe)."""
        groups = option_groups(self.stages)
        if len(self.stages) > 1:  # a full-precision first stage, and stages that can distil from it
            groups |= {"kd", "kd_soft"}
        if self.progressive:
            groups.add("progressive")
        return groups

    @property
    def options(self):
        """Names of the options that apply to this method."""
        groups = self.option_groups()
        return tuple(o.name for o in OPTIONS if o.group in groups)

    @property
    def precision(self):
        """Bits (weight, input) of the block linears, (Q, K) and (A, V) of the attention matmuls, and
        the quantizer extras of the final table: what minibvit.cost counts. 32 = FP32, 2 = ternary."""
        t = self.final.quantizer_table
        bits = {"linear": (_spec_bits(t.spec("blocks.0.mlp.fc1.weight")), _spec_bits(t.spec("blocks.0.mlp.fc1.input"))),
                "qk": (_spec_bits(t.spec("blocks.0.attn.q")), _spec_bits(t.spec("blocks.0.attn.k"))),
                "av": (_spec_bits(t.spec("blocks.0.attn.attn")), _spec_bits(t.spec("blocks.0.attn.v")))}
        return Precision(**bits, quantized=bool(t.patterns),
                         asm_thresholds=any(s.startswith("asm:") for s in t.specs()),
                         gsb_attention=t.spec("blocks.0.attn.attn") == "gsb_attn",
                         distilled=self.final.distilled)


@dataclass(frozen=True)
class Precision:
    linear: tuple
    qk: tuple
    av: tuple
    quantized: bool  # False: everything FP32 (also the patch embedding and the head)
    asm_thresholds: bool  # one FP32 threshold per channel in front of the activation binarizers but A
    gsb_attention: bool  # A and V as GSB bases (and the attention bias, V shift, a distillation token)
    distilled: bool


def option_groups(stages):
    """The option groups that apply to a sequence of stages: "grs" (binarized weights), "asm",
    "gsb", "ternary" (ternary weights) from the specs of their tables, "kd_soft" where one distils soft."""
    specs = set().union(*(s.quantizer_table.specs() for s in stages))
    groups = set()
    if any(_binarizes_weights(s) for s in specs):
        groups.add("grs")
    if any(_takes_asm(s) for s in specs):
        groups.add("asm")
    if specs & set(EXTRA_SPECS):
        groups.add("gsb")
    if any(s in tervit.TERNARY_SPECS.values() for s in specs):
        groups.add("ternary")
    if any(s.kd == "soft" for s in stages):
        groups.add("kd_soft")
    return groups


def _takes_asm(spec):
    """An activation binarizer ASM can sit in front of (--asm on), or one that has an ASM."""
    return spec.startswith(("asm:", "a_elastic"))


def _binarizes_weights(spec):
    entry = quant.QUANTIZER_SPECS.get(spec)
    return entry is not None and entry[0] is quant.WeightBinarizer


def _spec_bits(spec):
    base = spec[4:] if spec.startswith("asm:") else spec
    if base == "fp":
        return 32
    if base in EXTRA_SPECS or base in ("sign", "w_xnor") or base.startswith(("w_binary", "a_elastic")):
        return 1
    if base.startswith("w_ternary"):
        return 2
    if base.endswith("8") or "8_" in base:
        return 8
    raise ValueError(f"no bit width known for spec {spec!r}")


# ------------------------------------------------------------------------------------------------
# the data
# ------------------------------------------------------------------------------------------------

BINARY_TABLE = {
    "patch_embed.proj.weight": "w_minmax8",
    "patch_embed.proj.input": "a_minmax8_signed",
    "blocks.*.attn.qkv.weight": "w_binary",
    "blocks.*.attn.qkv.input": "a_elastic_signed",
    "blocks.*.attn.q": "a_elastic_signed",
    "blocks.*.attn.k": "a_elastic_signed",
    "blocks.*.attn.attn": "a_elastic_unsigned",
    "blocks.*.attn.v": "a_elastic_signed",
    "blocks.*.attn.proj.weight": "w_binary",
    "blocks.*.attn.proj.input": "a_elastic_signed",
    "blocks.*.mlp.fc1.weight": "w_binary",
    "blocks.*.mlp.fc1.input": "a_elastic_signed",
    "blocks.*.mlp.fc2.weight": "w_binary",
    "blocks.*.mlp.fc2.input": "a_elastic_unsigned",  # post-GELU: {0, alpha}
    "head*.weight": "w_minmax8",
    "head*.input": "a_minmax8_signed",
}
"""The binary baseline (as BiT's and GSB's code binarize a ViT): W1A1 block linears and attention,
8-bit patch embedding and head."""


def check_spec(spec):
    """Refuse a spec that is not a quantizer spec, asm:<spec> or a GSB spec."""
    base = spec[4:] if spec.startswith("asm:") else spec
    if base not in quant.QUANTIZER_SPECS and base not in EXTRA_SPECS:
        valid = sorted(quant.QUANTIZER_SPECS) + list(EXTRA_SPECS) + ["asm:<activation spec>"]
        raise ValueError(f"unknown quantizer spec {spec!r}; valid specs: {', '.join(valid)}")


TABLES = {t.name: t for t in (
    QuantizerTable("fp", {}, summary="full precision"),
    QuantizerTable("binary", BINARY_TABLE, packed="binary", summary="W1A1 baseline"),
    QuantizerTable("binaryvit", binaryvit.asm_table(BINARY_TABLE), packed="binary", hooks=("grs",),
                   summary="binary + ASM; trained with GRS"),
    QuantizerTable("gsb_stage1", gsb.STAGE1_TABLE, summary="GSB stage 1: binary MLP weights"),
    QuantizerTable("gsb", gsb.gsb_table(BINARY_TABLE), packed="gsb", summary="binary + GSB attention"),
    QuantizerTable("tervit_w8a8", tervit.W8A8_TABLE, summary="TerViT stage 1: W8A8"),
    QuantizerTable("tervit", tervit.TERNARY_TABLE, packed="ternary", summary="TerViT: ternary weights, A8"),
)}
"""Every quantizer table by name (a checkpoint's "scheme" names one)."""

METHODS = {m.name: m for m in (
    Method("fp", (Stage("fp", "fp", first=True),), "full precision"),
    Method("binary", (Stage("teacher", "fp", first=True),
                      Stage("binary", "binary", init="teacher", kd="soft")), "BiT-style W1A1 baseline"),
    Method("binaryvit", (Stage("teacher", "fp", first=True),
                         Stage("binaryvit", "binaryvit", init="teacher", kd="soft")),
           "BinaryViT (our reconstruction): binary + GRS + ASM"),
    Method("gsb", (Stage("teacher", "fp", first=True),
                   Stage("gsb_stage1", "gsb_stage1", init="teacher", kd="hard", distilled=True),
                   Stage("gsb", "gsb", init="gsb_stage1", kd="hard", distilled=True)),
           "GSB: group superposition binarization"),
    Method("tervit", (Stage("fp", "fp", first=True), Stage("tervit_w8a8", "tervit_w8a8", init="fp"),
                      Stage("tervit", "tervit", init="tervit_w8a8")), "TerViT: progressive ternary",
           progressive=("tervit_w8a8",)),
)}
"""Every method by name, in the order --help and the cost tables list them."""

OPTIONS = (
    Option("grs_lambda", "grs", None,
           "GRS strength; a value turns GRS on (0: off) in every binarized stage of the method",
           shown=f"{binaryvit.GRS_DEFAULT_LAMBDA:g} in binaryvit's stage, off elsewhere"),
    Option("grs_variant", "grs", binaryvit.GRS_DEFAULT_VARIANT, "GRS penalty", binaryvit.GRS_VARIANTS),
    Option("grs_warmup_epochs", "grs", binaryvit.GRS_DEFAULT_WARMUP_EPOCHS,
           "epochs of linear warm-up of the GRS strength from 0, counted from --grs-start-epoch"),
    Option("grs_start_epoch", "grs", binaryvit.GRS_DEFAULT_START_EPOCH,
           "epoch of the stage at which GRS starts (0: its first step; a late onset leaves the signs free first)"),
    Option("grs_schedule", "grs", binaryvit.GRS_DEFAULT_SCHEDULE,
           "GRS strength over the stage after the onset: constant, or annealed with a half cosine down to 0 or up "
           "from 0 (times the warm-up)", binaryvit.GRS_SCHEDULES),
    Option("grs_layer_norm", "grs", binaryvit.GRS_DEFAULT_LAYER_NORM,
           "per-layer GRS strength lam * f_l / mean(f): f = 1, 1 / the layer's mean|W| (scale), sqrt(fan-in)",
           binaryvit.GRS_LAYER_NORMS),
    Option("grs_flip_window", "grs", binaryvit.GRS_DEFAULT_FLIP_WINDOW,
           "regularize only the weights whose sign flipped within the last this many epochs (0: every weight)"),
    Option("asm", "asm", None, "ASM in front of the activation binarizers (off: exactly the method without ASM)",
           ("on", "off"), shown="on for binaryvit, off elsewhere"),
    Option("asm_center", "asm", binaryvit.ASM_DEFAULT_CENTER,
           "ASM data-driven centre (shift: no centre, the learnable shift alone; no ASM at all is --asm off)",
           binaryvit.ASM_CENTERS),
    Option("asm_momentum", "asm", binaryvit.ASM_DEFAULT_MOMENTUM,
           "ASM running-centre EMA momentum, in (0, 1]"),
    Option("asm_where", "asm", binaryvit.ASM_DEFAULT_PLACEMENT,
           "which activation binarizers get an ASM: all but the attention probabilities, the block linears' "
           "inputs, Q/K/V, or the signed ones", binaryvit.ASM_PLACEMENTS),
    Option("asm_scale", "asm", "on" if binaryvit.ASM_DEFAULT_SCALE else "off",
           "a learned per-channel scale in the ASM in front of each signed binarizer (its STE window)", ("on", "off")),
    Option("gsb_mode", "gsb", gsb.GSB_MODES[0], "GSB gradients: the official code's or our principled STEs",
           gsb.GSB_MODES),
    Option("gsb_max_over", "gsb", gsb.GSB_MAX_OVER[0],
           "GSB attention masks: max over the whole tensor (official) or per attention row", gsb.GSB_MAX_OVER),
    Option("kd", "kd", None, "distillation of every stage after the first from the first (full-precision) stage: "
           "none; soft (KL to its logits); hard (0.5 CE(y) + 0.5 CE(argmax teacher), through GSB's distillation "
           "token, which only hard keeps, else through the class head)", KD_KINDS,
           shown=", ".join(f"{m.name} {m.distillation}" for m in METHODS.values() if len(m.stages) > 1)),
    Option("kd_temperature", "kd_soft", 1.0, "soft-distillation temperature, > 0"),
    Option("kd_alpha", "kd_soft", 0.5, "soft distillation: loss = (1 - a) CE + a KD, a in [0, 1]"),
    Option("ternary_granularity", "ternary", tervit.TERNARY_GRANULARITIES[0],
           "ternary weights' threshold and scale per output channel (TerViT) or per tensor (TWN)",
           tervit.TERNARY_GRANULARITIES),
    Option("tervit_direct", "progressive", False, "leave out the progressive stages (TerViT's 8-bit stage): the "
           "final stage starts from the full-precision stage", shown="off"),
)
"""Method options: TrainConfig fields that only some methods take (Method.options)."""
OPTION_BY_NAME = {o.name: o for o in OPTIONS}


def get_method(name):
    """The Method record of a method name; a clear error for an unknown one."""
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose one of {', '.join(METHODS)}")
    return METHODS[name]


def check_options(method, given):
    """Refuse method options that do not apply to `method`, or not to its recipe as given (the soft-KD
    options without a soft-distilled stage). given: {option name: value}, only the options the user
    set (None or False = not set)."""
    m = get_method(method)
    given = {name: value for name, value in given.items() if value is not None and value is not False}
    _refuse(method, [name for name in given if name not in m.options], m.options)
    check_binaryvit_options(m, given)
    groups = option_groups(recipe(method, given.get("kd"), bool(given.get("tervit_direct"))))
    kd = given.get("kd") or m.distillation
    _refuse(f"{method} with --kd {kd}", [n for n in given if OPTION_BY_NAME[n].group == "kd_soft" and
                                         "kd_soft" not in groups], m.options, "add --kd soft or remove")


def _refuse(what, wrong, allowed, fix="remove"):
    if wrong:
        flags = ", ".join("--" + n.replace("_", "-") for n in wrong)
        allowed = ", ".join("--" + n.replace("_", "-") for n in allowed) or "none"
        raise ValueError(f"{flags} do(es) not apply to --method {what} (its method options: {allowed}); "
                         f"{fix} {'it' if len(wrong) == 1 else 'them'}")


def recipe(method, kd=None, direct=False):
    """The stages a run of `method` trains, in order (Stage records).

    kd (one of KD_KINDS, None: each stage's own) is the distillation of every stage after the first;
    the first (full-precision) stage is the teacher. A stage keeps its distillation token only while
    it distils "hard" (GSB: with --kd none or soft, the model has the class head only). Initialisation
    is separate: each stage still starts from its `init` stage whatever kd is. direct: the method's
    progressive stages are left out, and the stage after one starts from where it would have started
    (TerViT direct: fp -> tervit)."""
    m = get_method(method)
    if kd is not None:
        check_choice(kd, KD_KINDS, "kd")
        if len(m.stages) == 1:
            raise ValueError(f"--kd does not apply to --method {method}: it has no teacher stage to distil from")
    if direct and not m.progressive:
        raise ValueError(f"--method {method} has no progressive stages to leave out (a direct run)")
    stages, starts = [], {}  # starts: a left-out stage -> the stage it would have started from
    for s in m.stages:
        init = starts.get(s.init, s.init)
        if direct and s.name in m.progressive:
            starts[s.name] = init
            continue
        kind = s.kd if (kd is None or s.first) else kd
        stages.append(replace(s, init=init, kd=kind, distilled=s.distilled and kind == "hard"))
    return tuple(stages)


def stage_epochs(stages, epochs, teacher_epochs=None, explicit=None):
    """{stage name: epochs} of a recipe: the budget rule.

    The first (full-precision) stage trains teacher_epochs (None: epochs). `epochs` is the TOTAL of
    the quantized stages after it, split evenly, the earlier stages taking the remainder (5 over two
    stages: 3 + 2), so that methods with one or two quantized stages get the same quantized
    training. Each stage gets at least 1 epoch: a total below the number of quantized stages gives
    each 1 (more than asked; the trainer says so). explicit {stage name: epochs} sets the stages it
    names (the others keep the rule's share); a name that is not a stage of the recipe is refused."""
    names = [s.name for s in stages]
    unknown = [n for n in (explicit or {}) if n not in names]
    if unknown:
        raise ValueError(f"--stage-epochs names {', '.join(map(repr, unknown))}, not a stage of this run "
                         f"(its stages: {', '.join(names)})")
    out = {}
    quantized = [s.name for s in stages if not s.first]
    for s in stages:
        if s.first:
            out[s.name] = teacher_epochs or epochs
    share, extra = divmod(epochs, max(len(quantized), 1))
    for i, name in enumerate(quantized):
        out[name] = max(1, share + (i < extra))
    out.update(explicit or {})
    return {n: out[n] for n in names}


def asm_default(method):
    """Whether ASM is on in a method when --asm is not given: where one of its tables declares it."""
    return any(s.startswith("asm:") for t in method.tables for s in t.specs())


def check_binaryvit_options(method, given):
    """Refuse GRS / ASM option values that cannot work: ASM's switches while ASM is off, negative
    epochs. method: a Method; given: as check_options'."""
    asm_on = given.get("asm") == "on" or (given.get("asm") is None and asm_default(method))
    idle = [n for n in ("asm_center", "asm_momentum", "asm_where", "asm_scale") if given.get(n) is not None]
    if idle and not asm_on:
        flags = ", ".join("--" + n.replace("_", "-") for n in idle)
        raise ValueError(f"{flags} do(es) not apply to --method {method.name} with ASM off"
                         f"{' (its default)' if given.get('asm') is None else ''}; add --asm on or remove "
                         f"{'it' if len(idle) == 1 else 'them'}")
    for name in ("grs_start_epoch", "grs_flip_window"):
        v = given.get(name)
        if v is not None and not (isinstance(v, (int, float)) and v >= 0):
            raise ValueError(f"--{name.replace('_', '-')} must be a number of epochs >= 0, got {v!r}")


def grs_strength(stage, grs_lambda):
    """The GRS lambda of a stage: the given --grs-lambda, else GRS's default where the stage declares
    the hook, else 0 (off)."""
    if grs_lambda is not None:
        return grs_lambda
    return binaryvit.GRS_DEFAULT_LAMBDA if "grs" in stage.hooks else 0.0


# ------------------------------------------------------------------------------------------------
# building the quantizers of a table
# ------------------------------------------------------------------------------------------------

@dataclass
class QuantizerOptions:
    """Switches that choose among a quantizer's variants (stored in checkpoints as "scheme_options")."""

    asm: str = None  # "on", "off", or None: as the table declares (asm:<spec> entries)
    asm_center: str = binaryvit.ASM_DEFAULT_CENTER  # binaryvit.ASM_CENTERS
    asm_momentum: float = binaryvit.ASM_DEFAULT_MOMENTUM
    asm_where: str = binaryvit.ASM_DEFAULT_PLACEMENT  # binaryvit.ASM_PLACEMENTS
    asm_scale: str = "on" if binaryvit.ASM_DEFAULT_SCALE else "off"
    gsb_mode: str = gsb.GSB_MODES[0]  # "official" (the published code's gradients) or "principled"
    gsb_max_over: str = gsb.GSB_MAX_OVER[0]  # GSB attention masks: max over the whole "tensor" or per "row"
    ternary_granularity: str = tervit.TERNARY_GRANULARITIES[0]  # ternary weights per output "channel" or "tensor"

    def __post_init__(self):
        if self.asm is not None:
            check_choice(self.asm, ("on", "off"), "asm")
        binaryvit.check_asm_center(self.asm_center)
        check_choice(self.asm_where, binaryvit.ASM_PLACEMENTS, "asm_where")
        check_choice(self.asm_scale, ("on", "off"), "asm_scale")
        check_choice(self.gsb_mode, gsb.GSB_MODES, "gsb_mode")
        check_choice(self.gsb_max_over, gsb.GSB_MAX_OVER, "gsb_max_over")
        check_choice(self.ternary_granularity, tervit.TERNARY_GRANULARITIES, "ternary_granularity")


def tensor_roles(cfg):
    """Every quantizable tensor role of a model config, in forward order."""
    roles = ["patch_embed.proj.weight", "patch_embed.proj.input"]
    for i in range(cfg.depth):
        b = f"blocks.{i}"
        roles += [f"{b}.attn.qkv.weight", f"{b}.attn.qkv.input", f"{b}.attn.q", f"{b}.attn.k", f"{b}.attn.attn",
                  f"{b}.attn.v", f"{b}.attn.proj.weight", f"{b}.attn.proj.input", f"{b}.mlp.fc1.weight",
                  f"{b}.mlp.fc1.input", f"{b}.mlp.fc2.weight", f"{b}.mlp.fc2.input"]
    roles += ["head.weight", "head.input"]
    if cfg.distilled:
        roles += ["head_dist.weight", "head_dist.input"]
    return roles


def _table(name):
    if name not in TABLES:
        raise ValueError(f"unknown method or quantizer table {name!r}; choose one of {sorted(TABLES)}")
    return TABLES[name]


def resolve(cfg, table, overrides=None, options=None):
    """{role: spec} for every quantized role of quantizer table ``table`` (a method's final table has
    the method's name) with ``overrides`` (pattern -> spec) applied on top and the ternary
    granularity of ``options`` (QuantizerOptions; None: the defaults). Unknown names or specs raise
    ValueError."""
    granularity = (options or QuantizerOptions()).ternary_granularity
    patterns = {**_table(table).patterns, **(overrides or {})}
    for spec in patterns.values():
        check_spec(spec)
    out = {}
    for role in tensor_roles(cfg):
        spec = None
        for pattern, s in patterns.items():
            if fnmatchcase(role, pattern):
                spec = s
        if spec is not None and spec != "fp":
            out[role] = tervit.granular_spec(spec, granularity)
    return out


def _channels(cfg, role):
    """Channel count on the last axis of the tensor a role quantizes."""
    if role.endswith(("attn.q", "attn.k", "attn.v")):
        return cfg.embed_dim // cfg.num_heads
    if role.endswith("mlp.fc2.input"):
        return cfg.mlp_hidden
    if role == "patch_embed.proj.input":
        raise ValueError("ASM needs channels on the last axis; the patch-embedding input (B, C, H, W) has none")
    return cfg.embed_dim


def build_quantizers(cfg, table, overrides=None, options=None, dtype="float32"):
    """Fresh quantizer objects {role: quantizer} for a model config and quantizer table."""
    options = options or QuantizerOptions()
    out = {}
    specs = resolve(cfg, table, overrides, options)
    asm_on = options.asm == "on" or (options.asm is None and any(s.startswith("asm:") for s in specs.values()))
    # ASM where the table (and its overrides) declare it, unless --asm on or --asm-where place it
    place = asm_on and (options.asm == "on" or options.asm_where != binaryvit.ASM_DEFAULT_PLACEMENT)
    for role, spec in specs.items():
        if not asm_on or place:
            spec = asm_spec(role, spec, options.asm_where if asm_on else None)
        if spec == "gsb_attn":
            q = gsb.GSBAttnQuantizer(cfg.num_heads, cfg.num_tokens, mode=options.gsb_mode,
                                     max_over=options.gsb_max_over, dtype=dtype)
        elif spec == "gsb_value":
            q = gsb.GSBValueQuantizer(cfg.num_heads, cfg.embed_dim // cfg.num_heads, mode=options.gsb_mode,
                                      dtype=dtype)
        elif spec.startswith("asm:"):
            inner = quant.make_quantizer(spec[4:], dtype=dtype)
            q = binaryvit.ASM(inner, _channels(cfg, role), center=options.asm_center, momentum=options.asm_momentum,
                              dtype=dtype, scale=options.asm_scale == "on" and getattr(inner, "signed", False))
        else:
            q = quant.make_quantizer(spec, dtype=dtype)
        out[role] = q
    return out


def asm_spec(role, spec, where):
    """The spec of `role` with ASM on under placement `where` (binaryvit.asm_placement) or, where=None,
    off: "asm:<base>" where ASM sits, the bare <base> elsewhere."""
    base = spec[4:] if spec.startswith("asm:") else spec
    return f"asm:{base}" if where is not None and binaryvit.asm_placement(role, spec, where) else base


def binarized_weight_roles(quantizers):
    """Roles whose quantizer binarizes a latent weight (where GRS and the flip-rate diagnostics apply)."""
    return [role for role, q in quantizers.items() if isinstance(q, quant.WeightBinarizer)]


def ternary_weight_roles(quantizers):
    """Roles whose quantizer ternarizes a latent weight (where the ternary diagnostics apply)."""
    return [role for role, q in quantizers.items() if isinstance(q, quant.Ternarizer)]


def grs_settings(cfg, steps_per_epoch, epochs):
    """gradient_hooks' GRS keywords from a resolved TrainConfig (its grs_* fields, epochs as steps)."""
    return dict(grs_lambda=cfg.grs_lambda, grs_variant=cfg.grs_variant,
                grs_warmup_steps=int(cfg.grs_warmup_epochs * steps_per_epoch),
                grs_start_step=int(round(cfg.grs_start_epoch * steps_per_epoch)),
                total_steps=epochs * steps_per_epoch, grs_schedule=cfg.grs_schedule,
                grs_layer_norm=cfg.grs_layer_norm,
                grs_flip_window_steps=int(round(cfg.grs_flip_window * steps_per_epoch)))


def gradient_hooks(stage, quantizers, grs_lambda=None, grs_variant=binaryvit.GRS_DEFAULT_VARIANT,
                   grs_warmup_steps=0, grs_start_step=0, total_steps=None,
                   grs_schedule=binaryvit.GRS_DEFAULT_SCHEDULE, grs_layer_norm=binaryvit.GRS_DEFAULT_LAYER_NORM,
                   grs_flip_window_steps=0):
    """The gradient hooks a stage runs after backward: [binaryvit.GRSHook] when its GRS strength
    (grs_strength) is > 0 and it has binarized weights, else []. Each hook is called hook(model, step).
    The trainer passes grs_settings(cfg, steps_per_epoch, epochs)."""
    lam = grs_strength(stage, grs_lambda)
    roles = binarized_weight_roles(quantizers)
    if lam > 0 and roles:
        return [binaryvit.GRSHook(roles, lam, grs_variant, grs_warmup_steps, start_step=grs_start_step,
                                  total_steps=total_steps, schedule=grs_schedule, layer_norm=grs_layer_norm,
                                  flip_window=grs_flip_window_steps)]
    return []
