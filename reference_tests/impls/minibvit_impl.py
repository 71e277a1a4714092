"""minibvit's adapter, the reference tests' default implementation: minibvit/conformance/impl.py maps
every contract name (docs/conformance.md, "The adapter contract") to minibvit's objects, in one place."""
from minibvit.conformance.impl import *  # noqa: F401,F403
from minibvit.conformance.impl import __all__  # noqa: F401
