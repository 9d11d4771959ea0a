"""`python -m rljax.models.convert <file.gguf> <out_dir> [--dtype float32|bfloat16]`.

Converts a llama.cpp GGUF file into a Hugging Face directory (config.json, model.safetensors,
tokenizer files) with `rljax.models.gguf.convert_gguf`. The same command is `rljax convert`.
"""

from __future__ import annotations

import argparse
import sys

from rljax.models.gguf import DTYPES


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
  """Adds the convert command's arguments to `parser` (shared with `rljax convert`)."""
  parser.add_argument("gguf_file", help="path to the .gguf file")
  parser.add_argument("out_dir", help="output Hugging Face directory (created if missing)")
  parser.add_argument(
    "--dtype",
    choices=DTYPES,
    default="float32",
    help="dtype of model.safetensors (default float32)",
  )
  return parser


def run(args: argparse.Namespace) -> int:
  """Runs the conversion described by parsed `args`; returns the exit status (0)."""
  from rljax.models.gguf import convert_gguf  # noqa: PLC0415

  out = convert_gguf(args.gguf_file, args.out_dir, dtype=args.dtype)
  print(f"wrote {out}")
  return 0


def main(argv: list[str] | None = None) -> int:
  """Entry point: parses `argv` (default `sys.argv[1:]`) and converts."""
  parser = add_arguments(
    argparse.ArgumentParser(
      prog="python -m rljax.models.convert",
      description="Convert a GGUF file into a Hugging Face directory.",
    )
  )
  return run(parser.parse_args(argv))


if __name__ == "__main__":
  sys.exit(main())
