"""Convention profiles: the documented, legitimate ways in which two correct implementations of the
same quantizer may differ, written down as plain data.

A reference value (a golden file's expected output, a pytest case's expected array) is computed
under one profile and states which. An implementation is checked against the profile it claims:
``pytest reference_tests --profile gsb-official`` or the ``profile`` field of a golden manifest entry.

This module is plain data on purpose: it imports only the standard library, so any implementation's
runner (PyTorch, JAX, a C harness driven from Python) can read it without installing minibvit's
dependencies. Nothing here computes a quantizer.

The fields (every profile sets all of them):

``sign_zero``
    The value of ``sign(0)`` in every sign-based quantizer (sign STE, weight binarizers, elastic
    binarizers, the first GSB value basis). minibvit: ``+1.0`` (a binary code has no zero level).
    The official GSB code uses ``torch.sign``: ``0.0``.
``scale_floor``
    The floor of every learnable scale in forward, ``max(alpha, scale_floor)``, as a Python float
    (float64). minibvit: ``1e-5``, rounded to the working dtype (so 1e-5 exactly in float64). The
    official code compares against ``torch.tensor(0.00001).float()``, a float32 constant, so in
    float64 its floor is ``float32(1e-5) = 9.999999747378752e-06``. In float32 the two agree.
``gsb_init_count``
    Which elements the GSB value quantizer's ``alpha1`` initialisation averages ``|y|`` over,
    outside ``T1``. ``"all"``: every element outside ``T1``, exact zeros included (minibvit).
    ``"nonzero"``: only the non-zero ones (official ``AlphaInit`` ``qkv1``: ``torch.count_nonzero``).
    The other GSB inits already count only group members, which are never zero, so this field
    changes nothing else.
``gsb_first_forward``
    Which scales the very first training forward (the one that initialises them) uses.
    ``"stored"``: the stored initial values ``alpha1, alpha2, alpha3`` (minibvit).
    ``"subtract"``: the official code's local values ``alpha2 - alpha1`` and ``alpha3 - alpha2``,
    where the ``alpha_k`` are the stored initial values (its code writes ``alpha3 - (alpha2' +
    alpha1)`` with ``alpha2' = alpha2 - alpha1`` already reduced). Both are floored afterwards, and
    the backward of that forward uses the same local values. Every later forward uses the stored
    values in both profiles.
``gsb_mask_dtype``
    The dtype of the GSB group masks ``T1``, ``T2`` where they multiply a scale. ``"working"``: the
    input's dtype (minibvit). ``"float32"``: the official code builds them with ``.float()``, so with
    float64 input its attention forward's ``T1*alpha2 + T2*alpha3`` and the value quantizer's
    first-forward means ``sum(alpha1*T1)/sum(T1)`` and ``sum((alpha2'+alpha1)*T2)/sum(T2)`` are
    float32 (a 0-dim float64 scale times a float32 tensor stays float32 in torch), about 1e-8 off
    the float64 values. In float32 the two agree.
``gsb_empty_group``
    What a GSB quantizer does when the group ``T1`` or ``T2`` is empty (an all-zero value tensor;
    attention whose maximum is ``<= 0``). ``"zero_scale_grad"``: forward works, the group's
    ``1/sqrt(|G|)`` is taken as 0, so its scale gradient is 0 (minibvit).
    ``"zero_division_error"``: forward raises ``ZeroDivisionError`` (official: ``1.0 /
    math.sqrt(T1_mask.sum())`` on a Python float 0.0).
``gsb_empty_init_group``
    What the GSB init does when the set it averages over is empty (value: outside ``T1``, or
    ``T1`` minus ``T2``; attention: ``T1`` minus ``T2``). ``"fallback"``: the mean over the next
    larger set (``T1``, then everything), documented in docs/gsb.md (minibvit). ``"nan"``: the
    official 0/0 gives a NaN scale, which is stored; forward's floor (``NaN > eps`` is false) then
    uses ``scale_floor`` in its place, and during the first forward the NaN also reaches the local
    ``alpha3``.
"""
from dataclasses import asdict, dataclass, fields

DEFAULT_PROFILE = "minibvit"


@dataclass(frozen=True)
class Profile:
    name: str
    summary: str
    sign_zero: float
    scale_floor: float
    gsb_init_count: str
    gsb_first_forward: str
    gsb_mask_dtype: str
    gsb_empty_group: str
    gsb_empty_init_group: str

    def as_dict(self):
        """The profile as a JSON-ready dict (golden manifests embed it)."""
        return asdict(self)


CHOICES = {
    "sign_zero": (1.0, 0.0),
    "gsb_init_count": ("all", "nonzero"),
    "gsb_first_forward": ("stored", "subtract"),
    "gsb_mask_dtype": ("working", "float32"),
    "gsb_empty_group": ("zero_scale_grad", "zero_division_error"),
    "gsb_empty_init_group": ("fallback", "nan"),
}

# Which quantizers each field can change; a case outside these is profile-independent.
AFFECTS = {
    "sign_zero": ("sign_ste", "weight_binarizers", "elastic_binarizer", "gsb_value"),
    "scale_floor": ("elastic_binarizer", "lsq", "gsb_value", "gsb_attn"),
    "gsb_init_count": ("gsb_value_init",),
    "gsb_first_forward": ("gsb_value", "gsb_attn"),
    "gsb_mask_dtype": ("gsb_value", "gsb_attn"),
    "gsb_empty_group": ("gsb_value", "gsb_attn"),
    "gsb_empty_init_group": ("gsb_value_init", "gsb_attn_init"),
}

PROFILES = {
    "minibvit": Profile(
        name="minibvit",
        summary="minibvit's conventions (the default): sign(0) = +1, scale floor 1e-5 in the working "
        "dtype, GSB init over every element, stored scales from the first forward on, empty groups "
        "give a zero scale gradient, empty init sets fall back to the next larger set.",
        sign_zero=1.0,
        scale_floor=1e-5,
        gsb_init_count="all",
        gsb_first_forward="stored",
        gsb_mask_dtype="working",
        gsb_empty_group="zero_scale_grad",
        gsb_empty_init_group="fallback",
    ),
    "gsb-official": Profile(
        name="gsb-official",
        summary="the official GSB code's conventions (IMRL/GSB-Vision-Transformer, quant_new_new.py): "
        "sign(0) = 0, a float32 scale floor, count_nonzero in the value alpha1 init, the first "
        "forward uses alpha2 - alpha1 and alpha3 - alpha2, float32 masks, ZeroDivisionError on an empty group, "
        "NaN (used as the floor) on an empty init set.",
        sign_zero=0.0,
        scale_floor=9.999999747378752e-06,  # float(numpy.float32(1e-5))
        gsb_init_count="nonzero",
        gsb_first_forward="subtract",
        gsb_mask_dtype="float32",
        gsb_empty_group="zero_division_error",
        gsb_empty_init_group="nan",
    ),
}


def get_profile(name):
    """The profile called ``name``; a clear error listing the known names otherwise."""
    try:
        return PROFILES[name]
    except KeyError:
        raise ValueError(
            f"unknown convention profile {name!r}; known profiles: {', '.join(sorted(PROFILES))}"
        ) from None


def differences(a, b):
    """{field: (value in a, value in b)} for every convention field on which profiles a and b differ."""
    a, b = get_profile(a) if isinstance(a, str) else a, get_profile(b) if isinstance(b, str) else b
    skip = {"name", "summary"}
    return {
        f.name: (getattr(a, f.name), getattr(b, f.name))
        for f in fields(Profile)
        if f.name not in skip and getattr(a, f.name) != getattr(b, f.name)
    }


def _check(profile):
    for field, allowed in CHOICES.items():
        if getattr(profile, field) not in allowed:
            raise ValueError(f"profile {profile.name!r}: {field} must be one of {allowed}")
    if not 0.0 < profile.scale_floor < 1.0:
        raise ValueError(f"profile {profile.name!r}: scale_floor must be a small positive float")


for _p in PROFILES.values():
    _check(_p)
