"""Conformance kit: golden vectors any implementation can be checked against, and the convention
profiles (profiles.py) under which two correct implementations may legitimately differ.

    python -m minibvit.conformance export DIR            golden files (needs PyTorch and reference_tests/)
    python -m minibvit.conformance run DIR RESULTS       minibvit's outputs for every case
    python -m minibvit.conformance check DIR RESULTS     per-case error table; exit 1 on any failure

File format and manifest schema: minibvit/conformance/golden.py and docs/conformance.md.
Importing this package imports nothing else (no torch, no minibvit modules).
"""
