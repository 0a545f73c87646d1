"""``eqx-gn study`` (being built: issue 12)."""

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``eqx-gn study``."""


def main(args: argparse.Namespace) -> int:
    """Run ``eqx-gn study``."""
    raise NotImplementedError("eqx-gn study")
