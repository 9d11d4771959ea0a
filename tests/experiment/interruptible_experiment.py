"""The tiny SFT experiment of the interrupt / resume test (a file for `rljax train`): 40 steps,
no evaluation, TensorBoard on, and a `build_model` hook whose preamble is a `cached_stage` that records each
time it is computed (in `<run dir>/preamble_runs`)."""

import dataclasses
import os
import sys

from flax import nnx

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from tiny_experiment import MODEL, sft_config  # noqa: E402

from rljax.experiment.stage import cached_stage  # noqa: E402
from rljax.models.transformer import Transformer  # noqa: E402

STEPS = 40
_base = sft_config("runs/interruptible", tensorboard=True, plot=False, save_model=False)
config = dataclasses.replace(_base, steps=STEPS, data=dataclasses.replace(_base.data, eval=None))


def build_model(config, tokenizer):
  def preamble():
    with open(os.path.join(config.logging.out_dir, "preamble_runs"), "a") as f:
      f.write("computed\n")
    return Transformer(MODEL, rngs=nnx.Rngs(0))

  return cached_stage(config, "init", preamble, template=lambda: Transformer(MODEL,
                                                                              rngs=nnx.Rngs(1)))
