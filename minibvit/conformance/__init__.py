"""Conformance kit: golden vectors any implementation can be checked against, and the convention
profiles (profiles.py) under which two correct implementations may legitimately differ.

    python -m minibvit.conformance export DIR            golden files (needs PyTorch and reference_tests/)
    python -m minibvit.conformance run DIR RESULTS       minibvit's outputs for every case
    python -m minibvit.conformance check DIR RESULTS     per-case error table; exit 1 on any failure

File format and manifest schema: minibvit/conformance/golden.py and docs/conformance.md.
This package's own modules import no torch (only ``export`` does, when called) and reach minibvit's
code only through ``impl.py`` (imported by ``run`` and ``export``); ``golden.py`` and ``profiles.py``
need only NumPy, safetensors and the standard library.
"""
