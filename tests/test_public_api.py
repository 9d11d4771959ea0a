"""The public surface: top-level exports, the README's function table and its code examples."""

import pathlib
import re
import sys

import rljax

README = (pathlib.Path(__file__).parents[1] / "README.md").read_text()


def test_every_export_is_importable_from_the_top_level():
  for name in rljax.__all__:
    assert getattr(rljax, name) is not None
  assert rljax.gae is rljax.ops.gae and rljax.dpo_loss is rljax.losses.dpo_loss


def test_readme_table_lists_every_public_function():
  listed = set(re.findall(r"^\| `(\w+)\(", README, flags=re.M))
  functions = {n for n in rljax.__all__ if callable(getattr(rljax, n))}
  assert functions - listed == set(), "missing from the README table"
  assert listed - functions == set(), "listed in the README but not exported"


def test_readme_python_examples_run():
  blocks = re.findall(r"```python\n(.*?)```", README, flags=re.S)
  runnable = [b for b in blocks if not b.startswith("# Needs the converted SmolLM2")]
  assert len(runnable) >= 2
  root = str(pathlib.Path(__file__).parents[1])  # the examples run from the repository root
  if root not in sys.path:
    sys.path.insert(0, root)
  for block in runnable:
    exec(compile(block, "README.md", "exec"), {})
