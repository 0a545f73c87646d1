"""``python -m eqx_gn`` and the ``eqx-gn`` command: the language-model CLI.

The command lives in `eqx_gn.lm`, which needs the ``lm`` extra; without it, the
command says so in one line instead of a traceback.
"""

import sys


def main(argv: list[str] | None = None) -> int:
    """Run the ``eqx-gn`` command (see ``eqx-gn --help``)."""
    try:
        from eqx_gn.lm._cli import main as cli_main
    except ImportError as e:
        sys.stderr.write(f"eqx-gn: error: {' '.join(str(e).split())}\n")
        return 1
    return cli_main(argv)


if __name__ == "__main__":
    sys.exit(main())
