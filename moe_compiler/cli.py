"""``moe-compiler`` command line.

    moe-compiler --help
    moe-compiler passes        the pass pipeline and each pass's options
    moe-compiler options       the backend options (torch.compile(..., options={...}))
    moe-compiler plan TRACE    compare expert-placement methods on a routing trace, write a placement
    moe-compiler calibrate     measure this CPU for the cost model's profile (cached)
"""
from __future__ import annotations

import argparse
import sys


def _cmd_passes(args) -> int:
    from moe_compiler.passes import PIPELINE, pass_options

    print("moe_compiler pass pipeline (in order):")
    for i, cls in enumerate(PIPELINE):
        doc = (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else ""
        print(f"  {i:02d} {cls.name}: {doc}")
        for name, typ, default in pass_options(cls):
            print(f"       option {name}: {typ} = {default!r}")
    print('\nSet pass options with options={"pass_options": {"<pass>": {...}}}; '
          'skip passes with options={"disable_passes": [...]}.')
    return 0


def _cmd_options(args) -> int:
    from moe_compiler.config import describe_options

    for name, typ, default, comment in describe_options():
        print(f"{name} ({typ}, default {default}; env MOE_COMPILER_{name.upper()})\n    {comment}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moe-compiler",
                                     description="Inspect the moe torch.compile backend.")
    sub = parser.add_subparsers(dest="command")
    sub.add_parser("passes", help="list the pass pipeline and each pass's options").set_defaults(func=_cmd_passes)
    sub.add_parser("options", help="list the backend options").set_defaults(func=_cmd_options)
    from moe_compiler.cost_model.calibrate import add_calibrate_subcommand
    from moe_compiler.plan_cli import add_plan_subcommand

    add_plan_subcommand(sub)
    add_calibrate_subcommand(sub)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    return args.func(args) or 0


if __name__ == "__main__":
    sys.exit(main())
