"""python -m minibvit.conformance {export,run,check} ... (see minibvit/conformance/__init__.py)."""
import argparse
import sys

from . import golden



def _parser():
    p = argparse.ArgumentParser(prog="python -m minibvit.conformance",
                                description="Golden-vector conformance kit (docs/conformance.md).")
    sub = p.add_subparsers(dest="command", required=True)
    e = sub.add_parser("export", help="write the golden cases (safetensors) and manifest.json into DIR")
    e.add_argument("dir")
    r = sub.add_parser("run", help="compute an implementation's outputs for every case of DIR into RESULTS")
    r.add_argument("dir")
    r.add_argument("results")
    r.add_argument("--impl", default="minibvit",
                   help="'minibvit' (default) or a module path defining run_case(case, inputs)")
    c = sub.add_parser("check", help="compare RESULTS with the expected outputs of DIR; exit 1 on any failure")
    c.add_argument("dir")
    c.add_argument("results")
    c.add_argument("-v", "--verbose", action="store_true", help="one row per output, not only per case")
    for s in (e, r, c):
        s.add_argument("--cases", nargs="+", default=(), metavar="PATTERN",
                       help="only the cases whose name matches a shell-style pattern (e.g. 'op.*' 'quant.gsb_*')")
    return p


def _exporter():
    """reference_tests/golden_export.py of this checkout: the expected values come from the PyTorch
    reference models beside it, so PyTorch is imported there, never inside the minibvit package."""
    import importlib.util
    import os

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                        "reference_tests", "golden_export.py")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found: export needs a minibvit repository checkout with reference_tests/")
    spec = importlib.util.spec_from_file_location("minibvit_golden_export", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def main(argv=None):
    args = _parser().parse_args(argv)
    try:
        if args.command == "export":
            _exporter().export(args.dir, args.cases)
            return 0
        if args.command == "run":
            return 1 if golden.run(args.dir, args.results, args.impl, args.cases) else 0
        return 1 if golden.check(args.dir, args.results, args.cases, verbose=args.verbose) else 0
    except (FileNotFoundError, ValueError, ImportError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
