"""The `rljax` command line: `rljax <command> ...` (or `python -m rljax <command> ...`).

Commands:
  convert <file.gguf> <out_dir> [--dtype float32|bfloat16]
      GGUF → Hugging Face directory (`rljax.models.convert`).
  train <experiment> [--set key=value ...] [--resume] [--out DIR]
      runs an experiment (a Python file / module defining `config`, or a YAML / JSON file;
      schema in `rljax.experiment.config`). Ctrl-C (SIGINT) or SIGTERM checkpoints the step in
      flight and exits (130 / 143) printing the command that resumes the run; a second Ctrl-C
      exits at once. Exit status 2: a bad config.
"""

from __future__ import annotations

import argparse
import shlex
import sys

from rljax.models import convert


def _add_train_arguments(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("experiment", help="experiment: a .py file or module defining `config`, "
                      "or a .yaml / .json file")
  parser.add_argument("--set", dest="overrides", action="append", default=[],
                      metavar="KEY=VALUE", help="override a config field, e.g. --set "
                      "optimizer.learning_rate=1e-4 (repeatable; values parse as JSON)")
  parser.add_argument("--resume", action="store_true",
                      help="continue from the latest checkpoint in the run directory")
  parser.add_argument("--out", default=None, help="run directory (overrides logging.out_dir)")


def resume_command(args: argparse.Namespace, out_dir: str) -> str:
  """The `rljax train ... --resume --out DIR` line that continues an interrupted run."""
  sets = [part for override in args.overrides for part in ("--set", override)]
  return shlex.join(["rljax", "train", args.experiment, *sets, "--resume", "--out", out_dir])


def _run_train(args: argparse.Namespace) -> int:
  from rljax.experiment.config import ConfigError
  from rljax.experiment.runner import RunInterrupted, run_experiment

  try:
    run_experiment(args.experiment, args.overrides, resume=args.resume, out_dir=args.out)
  except ConfigError as e:
    print(f"rljax train: error: {e}", file=sys.stderr)
    return 2
  except RunInterrupted as e:
    how = "" if e.step is None else f"; resume with: {resume_command(args, e.out_dir)}"
    print(f"rljax train: {e}{how}", file=sys.stderr)
    return e.exit_code
  return 0


def build_parser() -> argparse.ArgumentParser:
  """The argparse parser with one sub-parser per command."""
  parser = argparse.ArgumentParser(prog="rljax", description="rljax: RL for LLMs in JAX.")
  commands = parser.add_subparsers(dest="command", required=True, metavar="command")
  convert_parser = commands.add_parser(
    "convert", help="convert a GGUF file into a Hugging Face directory"
  )
  convert.add_arguments(convert_parser)
  convert_parser.set_defaults(run=convert.run)
  train_parser = commands.add_parser("train", help="run an experiment")
  _add_train_arguments(train_parser)
  train_parser.set_defaults(run=_run_train)
  return parser


def main(argv: list[str] | None = None) -> int:
  """Entry point of the `rljax` script; `argv` defaults to `sys.argv[1:]`."""
  args = build_parser().parse_args(argv)
  return args.run(args)


if __name__ == "__main__":
  sys.exit(main())
