"""``hopgate-export``: build a bundle from one config, step by step or at once, or attach a gate
to an existing classifier. ``hopgate-export --help`` lists the commands, ``hopgate-export CMD
--help`` shows one command's options.

A mistake in the config, the data or the order of steps ends the command with one line that
names the problem and the fix (exit 2); anything else with one line too (exit 1). ``--debug``
shows the traceback instead."""

from __future__ import annotations

import argparse
import json
import sys

import yaml

from .config import ConfigError, load_config

# errors whose message already names the problem and the fix: printed as they are, exit 2
EXPECTED = {"ConfigError", "DataError", "ArtifactError", "BuildError", "VerdictError",
            "ParityError"}


def _overrides(pairs: list[str]) -> dict:
    out = {}
    for p in pairs:
        key, sep, value = p.partition("=")
        if not sep:
            raise ConfigError(f"--set expects key=value, got {p!r}")
        out[key] = yaml.safe_load(value)  # typed: 3 -> int, true -> bool, [28,28] -> list
    return out


# each command and its line in ``hopgate-export --help``
COMMANDS = {
    "train": "train the backbone classifier on the ID images",
    "fit": "fit the RecLag memory banks on the backbone's features",
    "calibrate": "set the threshold at the target TPR on held-out ID images",
    "export": "write the ONNX bundle and its model card; check parity with PyTorch",
    "exemplars": "add each memory's class and training images to the bundle (the web page)",
    "build": "train, fit, calibrate, export and exemplars in one go",
    "evaluate": "score ID test and far-OOD images (--report DIR: the full benchmark)",
    "openset": "write the open-set benchmark's data and build its model",
    "attach": "a gate for an existing classifier (ONNX, TorchScript): docs/attach.md",
}


def parser() -> argparse.ArgumentParser:
    listing = "\n".join(f"  {name:<11}{line}" for name, line in COMMANDS.items())
    ap = argparse.ArgumentParser(
        prog="hopgate-export", description="Build a hopgate bundle (.onnx) from one config.",
        epilog=f"commands:\n{listing}\n\nhopgate-export CMD --help shows a command's options.",
        formatter_class=argparse.RawDescriptionHelpFormatter)  # the listing, a line each
    sub = ap.add_subparsers(dest="command", required=True, metavar="CMD",
                            help="one of the commands below")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", "-c",
                        help="YAML/JSON build config (default: built-in defaults)")
    common.add_argument("--set", "-s", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set memory.beta=2 (repeatable)")
    common.add_argument("--no-progress", action="store_true", help="no progress bars")
    common.add_argument("--json", help="also write the step's report to this JSON file")
    common.add_argument("--debug", action="store_true",
                        help="show tracebacks instead of one line")
    for name, line in COMMANDS.items():
        cmd = sub.add_parser(name, description=line[0].upper() + line[1:] + ".",
                             parents=[] if name == "attach" else [common])
        cmd.set_defaults(report=None, extra=[], bootstrap=200, no_card=False)
        if name == "evaluate":
            cmd.add_argument("--report", metavar="DIR",
                             help="write the full benchmark (baselines, ablations, plots) to DIR")
            cmd.add_argument("--with", dest="extra", action="append", default=[],
                             metavar="CONFIG",
                             help="--report: also benchmark this config (open-set, EfficientNet)")
            cmd.add_argument("--bootstrap", type=int, default=200, help="--report: resamples")
        if name in ("build", "export"):
            cmd.add_argument("--no-card", action="store_true",
                             help="skip the model card (and the evaluation it runs)")
    return ap


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["attach"]:  # its own arguments: a gate for the user's classifier
        from .attach.cli import main as attach

        return attach(argv[1:])
    args = parser().parse_args(argv)
    try:
        return run(args, argv)
    except Exception as e:  # one line, no traceback: the message says what to fix
        if args.debug:
            raise
        names = {c.__name__ for c in type(e).__mro__}
        text = " ".join(str(e).split()) or type(e).__name__
        if names & EXPECTED:
            kind = "config error" if "ConfigError" in names else "error"
            print(f"hopgate-export: {kind}: {text}", file=sys.stderr)
            return 2
        print(f"hopgate-export: {type(e).__name__}: {text} (run again with --debug for the "
              "traceback)", file=sys.stderr)
        return 1


def run(args: argparse.Namespace, argv: list[str] | None) -> int:
    cfg = load_config(args.config, _overrides(args.set))
    from . import pipeline  # torch is imported only once the config is known to be good
    from .data.splits import Sets

    progress = not args.no_progress
    sets = Sets(cfg)  # the command's data, each set loaded at most once
    if args.command == "openset":
        from .evaluation.openset import prepare

        report = prepare(cfg, progress)
    elif args.command == "evaluate" and args.report:
        from .evaluation.report import run_report

        extra = [load_config(c) for c in args.extra]
        command = " ".join(["hopgate-export"] + (argv if argv is not None else sys.argv[1:]))
        report = run_report(cfg, args.report, extra, command=command, n_boot=args.bootstrap,
                            progress=progress)
    elif args.command == "evaluate":
        from .evaluation.evaluate import format_quick, quick_report

        report = quick_report(cfg, progress, sets)
        print(format_quick(report))
    else:
        report = (pipeline.build(cfg, progress, sets) if args.command == "build"
                  else pipeline.STEPS[args.command](cfg, progress, sets))
        if args.command in ("build", "export") and not args.no_card:  # the bundle's card
            from .evaluation.card import write_card
            from .evaluation.evaluate import quick_report

            exported = report["export"] if args.command == "build" else report
            card = write_card(cfg, exported, quick_report(cfg, progress, sets), args.config,
                              report.get("seconds"), args.set)
            print(f"[hopgate-export] model card {card}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
