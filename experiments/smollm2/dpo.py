"""DPO on arithmetic word problems with SmolLM2-135M-Instruct: correct vs. wrong worked answers.

  RLJAX_SMOLLM2_DIR=smollm2 rljax train experiments/smollm2/dpo.py --out runs/smollm2_dpo

Preference pairs are built in code from `word_problems.py`: the prompt is the chat-templated
problem (the same prompt as `grpo.py`), chosen = a correct worked answer
("43 + 38 = 81.\\n#### 81"), rejected = the same working with an arithmetic slip of ±1..3
("43 + 38 = 83.\\n#### 83"). Sigmoid DPO (β = 0.1) against the frozen instruct model, whose
log-probs the runner computes once per batch; 32 pairs per step, AdamW lr 5e-7 (a common DPO
choice for small instruct models; higher rates make the chosen log-ratio fall too — likelihood
displacement) with 10 warmup steps; 300 steps. Sized for one GPU.

Evaluation (the `evaluate` hook, every 50 steps): held-out preference metrics (eval/loss,
eval/reward_accuracy, ...) on 200 held-out pairs, and eval/greedy_accuracy — greedy answers
(`rljax.rollout.generate`, up to 128 new tokens) to the first 100 held-out problems, scored by
`math_answer_reward`. `--set data.eval=null` turns both off.

CPU smoke run (2 cores; a few steps, no evaluation):

  RLJAX_SMOLLM2_DIR=/tmp/smollm2-hf rljax train experiments/smollm2/dpo.py \\
    --set steps=3 --set data.batch_size=2 --set data.eval=null --out /tmp/smol_dpo

Measured on the 2-core CPU (shared with other jobs, so rough): 24.9 s (step 1, with compilation),
10.3 s, 10.2 s per step of 2 pairs padded to 128 tokens; 1 min 28 s wall for the command
including model loading and the final model / plot. The evaluation hook on 4 held-out pairs and
4 greedy answers of 48 tokens took ~20 s (with compilation).
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import jax  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from experiments.smollm2.word_problems import (  # noqa: E402
  eval_problems,
  preference_rows,
  prompt_rows,
  train_problems,
)
from rljax.data.batching import collate_prompts  # noqa: E402
from rljax.data.tokenize import tokenize_dataset  # noqa: E402
from rljax.experiment.build import pad_id_of  # noqa: E402
from rljax.experiment.config import (  # noqa: E402
  DataSection,
  ExperimentConfig,
  LoggingSection,
  ModelSection,
)
from rljax.experiment.evaluation import evaluate_supervised  # noqa: E402
from rljax.rewards import math_answer_reward  # noqa: E402
from rljax.rollout.generate import generate  # noqa: E402
from rljax.train.optim import OptimizerConfig  # noqa: E402
from rljax.train.supervised import DPOConfig  # noqa: E402

MODEL_DIR = os.environ.get("RLJAX_SMOLLM2_DIR", "smollm2")
NUM_EVAL = 200
GREEDY_EVAL_PROBLEMS = 100  # held-out problems answered greedily at each evaluation
GREEDY_BATCH = 50
GREEDY_MAX_NEW_TOKENS = 128


def train_rows() -> list[dict[str, str]]:
  """5000 {"prompt", "chosen", "rejected"} rows, disjoint from the held-out problems."""
  return preference_rows(train_problems(5000, num_eval=NUM_EVAL), seed=0)


def eval_rows() -> list[dict[str, str]]:
  """200 held-out preference rows."""
  return preference_rows(eval_problems(NUM_EVAL), seed=1)


_PROMPTS: dict[int, list] = {}


def _greedy_batches(run) -> list:
  """Left-padded prompt batches of the first GREEDY_EVAL_PROBLEMS held-out problems (cached)."""
  key = id(run)
  if key not in _PROMPTS:
    records, _ = tokenize_dataset(run.tokenizer,
                                  prompt_rows(eval_problems(NUM_EVAL)[:GREEDY_EVAL_PROBLEMS]),
                                  "prompt", chat=True)
    pad = pad_id_of(run.tokenizer)
    _PROMPTS[key] = [collate_prompts(records[i:i + GREEDY_BATCH], pad_id=pad, buckets=[96])
                     for i in range(0, len(records), GREEDY_BATCH)]
  return _PROMPTS[key]


def greedy_accuracy(run, state) -> float:
  """Fraction of held-out problems whose greedy answer is right (`math_answer_reward`)."""
  tok, sampler = run.tokenizer, nnx.merge_state(state.params, state.frozen)
  right, total = 0.0, 0
  for batch in _greedy_batches(run):
    out = generate((run.graphdef, sampler), batch.tokens, batch.mask, jax.random.key(0),
                   max_new_tokens=GREEDY_MAX_NEW_TOKENS, temperature=0.0,
                   stop_tokens=[tok.eos_token_id], pad_id=pad_id_of(tok))
    p = batch.tokens.shape[1]
    texts = tok.batch_decode([row[p:p + n].tolist() for row, n in
                              zip(np.asarray(out.tokens), np.asarray(out.lengths))],
                             skip_special_tokens=True)
    right += float(math_answer_reward(batch.texts, texts, answer=batch.fields["answer"]).sum())
    total += len(texts)
  return right / max(total, 1)


def evaluate(run, state) -> dict[str, float]:
  """Held-out preference metrics and greedy accuracy; nothing when `data.eval` is None."""
  if not run.eval_batches:
    return {}
  return {**evaluate_supervised(run, state), "greedy_accuracy": greedy_accuracy(run, state)}


config = ExperimentConfig(
  algorithm="dpo",
  steps=300,
  model=ModelSection(path=MODEL_DIR),
  data=DataSection(train=train_rows, eval=eval_rows, kind="preference", batch_size=32,
                   eval_batch_size=100, max_length=128, buckets=(128,), chat=True),
  objective=DPOConfig(beta=0.1),
  optimizer=OptimizerConfig(5e-7, warmup_steps=10),
  logging=LoggingSection(out_dir="runs/smollm2_dpo", eval_every=50, save_every=100),
)
