"""``pdm-agent evaluate {skab,cwru,neu}``: each dataset's protocol lives in its own module."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from pdm_tools.evaluation import cwru, neu, skab

    sub = parser.add_subparsers(dest="dataset", required=True, metavar="DATASET")
    skab_parser = sub.add_parser(
        "skab",
        help="SKAB anomaly detection, published protocol (F1, FAR, MAR pooled point-wise)",
        description=skab.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    skab.add_arguments(skab_parser)
    skab_parser.set_defaults(evaluate=skab.main)
    cwru_parser = sub.add_parser(
        "cwru",
        help="CWRU bearing defect classification: cross-load and random-split results",
        description=cwru.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    cwru.add_arguments(cwru_parser)
    cwru_parser.set_defaults(evaluate=cwru.main)
    neu_parser = sub.add_parser(
        "neu",
        help="NEU surface defect images: the shipped image model, FP32 vs INT8, latency",
        description=neu.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    neu.add_arguments(neu_parser)
    neu_parser.set_defaults(evaluate=neu.main)


def main(args: argparse.Namespace) -> int:
    return int(args.evaluate(args))
