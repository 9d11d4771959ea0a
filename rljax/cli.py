"""The `rljax` command line: `rljax <command> ...`.

Commands:
  convert <file.gguf> <out_dir> [--dtype float32|bfloat16]
      GGUF → Hugging Face directory (`rljax.models.convert`).
"""

from __future__ import annotations

import argparse
import sys

from rljax.models import convert


def build_parser() -> argparse.ArgumentParser:
  """The argparse parser with one sub-parser per command."""
  parser = argparse.ArgumentParser(prog="rljax", description="rljax: RL for LLMs in JAX.")
  commands = parser.add_subparsers(dest="command", required=True, metavar="command")
  convert_parser = commands.add_parser(
    "convert", help="convert a GGUF file into a Hugging Face directory"
  )
  convert.add_arguments(convert_parser)
  convert_parser.set_defaults(run=convert.run)
  return parser


def main(argv: list[str] | None = None) -> int:
  """Entry point of the `rljax` script; `argv` defaults to `sys.argv[1:]`."""
  args = build_parser().parse_args(argv)
  return args.run(args)


if __name__ == "__main__":
  sys.exit(main())
