"""Implementations the reference tests can be pointed at with ``--impl impls.NAME``: minibvit's own
adapter (the default), the tests' PyTorch references, a deliberately broken implementation, and the
official GSB code from the user's checkout."""
