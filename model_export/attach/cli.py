"""``hopgate-export attach``: the command line of model_export.attach (docs/attach.md)."""

from __future__ import annotations

import argparse
import json
import sys

import yaml

from ..config import ConfigError


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(
        prog="hopgate-export attach",
        description="Build a gate bundle in front of your own classifier (docs/attach.md).")
    ap.add_argument("--model", "-m", required=True,
                    help="the classifier: file.onnx, TorchScript file.pt or package.module:factory")
    ap.add_argument("--data", "-d", required=True,
                    help="folder:DIR of its training images, one sub-folder per class")
    ap.add_argument("--config", "-c", help="attach YAML/JSON (preprocessing, labels, memory)")
    ap.add_argument("--set", "-s", action="append", default=[], metavar="KEY=VALUE",
                    help="override a config value, e.g. --set preprocess.resize=center_crop")
    ap.add_argument("--features", help="the penultimate tensor (default: found in the graph)")
    ap.add_argument("--output", "-o", help="the bundle to write (default: the config's output)")
    ap.add_argument("--test", metavar="folder:DIR",
                    help="ID images the build never sees: report the share the gate accepts")
    ap.add_argument("--ood", action="append", default=[], metavar="folder:DIR",
                    help="your own OOD images for the report (repeatable; every image under DIR)")
    ap.add_argument("--ood-sets", metavar="NAMES",
                    help="built-in OOD sets of the report, comma-separated (noise, digits, "
                         "glyphs, faces, fashion_mnist), or none")
    ap.add_argument("--json", help="also write the report to this JSON file")
    ap.add_argument("--no-progress", action="store_true", help="no progress bars")
    ap.add_argument("--debug", action="store_true", help="tracebacks instead of one-line errors")
    args = ap.parse_args(argv)

    from .config import load_attach_config

    overrides = {}
    for pair in args.set:
        key, sep, value = pair.partition("=")
        if not sep:
            print(f"hopgate-export attach: --set expects key=value, got {pair!r}", file=sys.stderr)
            return 2
        overrides[key] = yaml.safe_load(value)
    if args.features:
        overrides["features"] = args.features
    if args.output:
        overrides["output"] = args.output
    for spec in args.ood:
        if not spec.startswith("folder:"):
            print(f"hopgate-export attach: --ood {spec!r}: give folder:DIR", file=sys.stderr)
            return 2
    if args.ood:
        overrides["ood_folders"] = args.ood
    if args.ood_sets is not None:
        names = [n.strip() for n in args.ood_sets.split(",") if n.strip()]
        overrides["ood_sets"] = [] if names == ["none"] else names
    try:
        cfg = load_attach_config(args.config, overrides)
    except ConfigError as e:
        print(f"hopgate-export attach: config error: {e}", file=sys.stderr)
        return 2

    from ..calibrate import VerdictError
    from ..data.sources import DataError
    from .build import run_attach
    from .config import AttachError

    try:
        report = run_attach(cfg, args.model, args.data, args.test, not args.no_progress)
    except (AttachError, DataError, VerdictError) as e:  # the message names the fix
        if args.debug:
            raise
        print(f"hopgate-export attach: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # one line too, as the other commands (--debug: the traceback)
        if args.debug:
            raise
        first = next((x for x in str(e).splitlines() if x.strip()), "")
        print(f"hopgate-export attach: {type(e).__name__}: {first}", file=sys.stderr)
        return 1
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2, default=str)
    return 0
