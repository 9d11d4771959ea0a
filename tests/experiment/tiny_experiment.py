"""Tiny from-scratch experiments for the runner tests (tiny word-level tokenizer, 2-layer model)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from rljax.experiment.config import DataSection, ExperimentConfig, LoggingSection, ModelSection
from rljax.models.config import ModelConfig
from rljax.rollout.sampling import SamplingConfig
from rljax.train.grpo import GRPOConfig
from rljax.train.optim import OptimizerConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for tiny_tokenizer
from tiny_tokenizer import WORDS, tiny_tokenizer  # noqa: E402

VOCAB = 4 + len(WORDS)
MODEL = ModelConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_layers=2,
                    num_heads=4, num_kv_heads=2)
FAST = {"xla_backend_optimization_level": 0}


def sft_rows() -> list[dict]:
  prompts = ["what is 2 + 3 ?", "what is 3 + 2 ?", "hello world ?", "what is the answer ?",
             "what is 5 ?", "hello ?"]
  responses = ["5", "5", "hello world", "the answer is 5", "5", "world"]
  return [{"prompt": p, "response": r} for p, r in zip(prompts, responses)] * 2


def prompt_rows() -> list[dict]:
  return [{"prompt": "what is 2 + 3 ?", "answer": "5"}, {"prompt": "hello world ?", "answer": "5"},
          {"prompt": "what is 3 + 2 ?", "answer": "5"}, {"prompt": "what is 5 ?", "answer": "5"}]


def five_reward(prompts, completions, **fields):
  """Fraction of the completion's words that are "5" (needs the `answer` field)."""
  assert len(fields["answer"]) == len(completions)
  return np.array([c.split().count("5") / max(len(c.split()), 1) for c in completions],
                  np.float32)


def sft_config(out_dir: str, **logging) -> ExperimentConfig:
  return ExperimentConfig(
    algorithm="sft", steps=6, model=ModelSection(config=MODEL), tokenizer=tiny_tokenizer,
    data=DataSection(train=sft_rows, eval=sft_rows, batch_size=2, buckets=(16,)),
    optimizer=OptimizerConfig(1e-2), compiler_options=FAST, num_devices=1,
    logging=LoggingSection(**{"out_dir": out_dir, "progress": False, "tensorboard": False,
                              **logging}))


def grpo_config(out_dir: str) -> ExperimentConfig:
  return ExperimentConfig(
    algorithm="grpo", steps=3, model=ModelSection(config=MODEL), tokenizer=tiny_tokenizer,
    data=DataSection(train=prompt_rows, eval=prompt_rows, batch_size=2, buckets=(8,)),
    reward=five_reward,
    grpo=GRPOConfig(sampling=SamplingConfig(num_samples=4, max_new_tokens=4)),
    optimizer=OptimizerConfig(1e-2), compiler_options=FAST, eval_k=2, num_devices=1,
    logging=LoggingSection(out_dir=out_dir, progress=False, eval_every=2))
