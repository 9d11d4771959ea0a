"""The addition pipeline through rljax: data → SFT (make_train_step + sft_loss) → GRPO → eval.

  build_data(config)               tokenized SFT records (careless demonstrations), RL prompts,
                                   held-out evaluation prompts
  new_policy(config, vocab_size)   a small Llama-style `Transformer` built from scratch
  run_sft(config, data, ...)       supervised fine-tuning on the demonstrations
  make_grpo_trainer(...)           `GRPOTrainer` with the exact-match verifier
  run_grpo(config, data, ...)      GRPO steps on the training prompts
  run(config)                      all of it; greedy accuracy on held-out problems before / after RL
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from flax import nnx

from experiments.addition.task import (
  char_tokenizer,
  demonstrations,
  exact_match_reward,
  has_carry,
  prompt_rows,
  sample_problems,
  written,
)
from rljax.data.batching import collate_prompts, collator
from rljax.data.iterator import BatchIterator
from rljax.data.tokenize import tokenize_dataset
from rljax.models.config import ModelConfig
from rljax.models.lora import LoRAConfig, add_lora, lora_trainable
from rljax.models.transformer import Transformer
from rljax.rollout.sampling import SamplingConfig
from rljax.train.grpo import GRPOConfig, GRPOTrainer
from rljax.train.onpolicy import UpdateConfig
from rljax.train.objectives import sft_loss, sft_token_count
from rljax.train.optim import OptimizerConfig, make_optimizer
from rljax.train.state import TrainState, create_train_state
from rljax.train.step import make_train_step


def parse_overrides(items: list[str], *classes: type) -> list[dict[str, Any]]:
  """`--set FIELD=VALUE` items → one kwargs dict per settings dataclass in `classes` (values are
  cast to the type of the field's default; an unknown field exits listing the valid ones)."""
  defaults = [cls() for cls in classes]
  out: list[dict[str, Any]] = [{} for _ in classes]
  for item in items:
    name, _, value = item.partition("=")
    owner = next((i for i, d in enumerate(defaults) if hasattr(d, name)), None)
    if owner is None:
      valid = [f.name for cls in classes for f in dataclasses.fields(cls)]
      raise SystemExit(f"unknown field {name!r}; valid: {', '.join(valid)}")
    kind = type(getattr(defaults[owner], name))
    out[owner][name] = value.lower() in ("1", "true", "yes") if kind is bool else kind(value)
  return out


@dataclasses.dataclass(frozen=True)
class AdditionConfig:
  """Every knob of the run (defaults: the README's numbers, < 5 min on a 2-core CPU)."""

  seed: int = 0
  # task
  digits: int = 3
  forget_prob: float = 0.75
  reverse: bool = True
  num_demonstrations: int = 40_000
  num_rl_prompts: int = 20_000
  num_eval: int = 1000
  # model
  hidden_size: int = 128
  intermediate_size: int = 256
  num_layers: int = 2
  num_heads: int = 4
  # SFT
  sft_steps: int = 800
  sft_batch_size: int = 128
  sft_learning_rate: float = 3e-3
  sft_warmup_steps: int = 100
  # RL (GRPO)
  rl_steps: int = 60
  rl_prompts_per_step: int = 32
  group_size: int = 8
  rl_learning_rate: float = 3e-4
  temperature: float = 1.0
  kl_coef: float = 0.0
  num_epochs: int = 1
  # LoRA for the RL stage: rank 0 trains every weight; rank r > 0 trains adapters of rank r on
  # all seven projections (alpha = 2r), the SFT weights frozen (raise rl_learning_rate ~10×)
  lora_rank: int = 0

  @property
  def prompt_length(self) -> int:
    """<bos> a + b = : the prompt length (every prompt has it)."""
    return 1 + 2 * self.digits + 2

  @property
  def max_new_tokens(self) -> int:
    """digits + 1 answer digits and <eos>."""
    return self.digits + 2

  def sampling(self, num_samples: int) -> SamplingConfig:
    """The sampling options of this task (shared by GRPO, PPO and the sampled evaluations)."""
    return SamplingConfig(num_samples=num_samples, max_new_tokens=self.max_new_tokens,
                          temperature=self.temperature)

  def grpo_config(self) -> GRPOConfig:
    return GRPOConfig(sampling=self.sampling(self.group_size), kl_coef=self.kl_coef,
                      update=UpdateConfig(num_epochs=self.num_epochs))


@dataclasses.dataclass
class AdditionData:
  tokenizer: Any
  sft_records: list
  rl_records: list
  eval_batch: Any  # PromptBatch of the held-out problems
  demo_accuracy: float
  carry_free_fraction: float


def build_data(config: AdditionConfig) -> AdditionData:
  """Disjoint train / held-out problems; the SFT set holds the careless demonstrations."""
  rng = np.random.default_rng(config.seed)
  tok = char_tokenizer()
  held_out = sample_problems(config.num_eval, rng, digits=config.digits)
  train = sample_problems(config.num_demonstrations, rng, digits=config.digits,
                          exclude=set(held_out))
  demos = demonstrations(train, rng, digits=config.digits,
                       forget_prob=config.forget_prob, reverse=config.reverse)
  demo_accuracy = float(np.mean([d["response"] == written(a + b, config.digits, config.reverse)
                                 for d, (a, b) in zip(demos, train)]))
  sft_records, _ = tokenize_dataset(tok, demos, "sft")
  rl_problems = train[: config.num_rl_prompts]
  fmt = {"digits": config.digits, "reverse": config.reverse}
  rl_records, _ = tokenize_dataset(tok, prompt_rows(rl_problems, **fmt), "prompt")
  eval_records, _ = tokenize_dataset(tok, prompt_rows(held_out, **fmt), "prompt")
  eval_batch = collate_prompts(eval_records, pad_id=tok.pad_token_id,
                               buckets=[config.prompt_length])
  carry_free = float(np.mean([not has_carry(a, b, config.digits) for a, b in held_out]))
  return AdditionData(tok, sft_records, rl_records, eval_batch, demo_accuracy, carry_free)


def new_policy(config: AdditionConfig, vocab_size: int) -> Transformer:
  model_config = ModelConfig(
    vocab_size=vocab_size, hidden_size=config.hidden_size,
    intermediate_size=config.intermediate_size, num_layers=config.num_layers,
    num_heads=config.num_heads, num_kv_heads=config.num_heads, max_position_embeddings=32,
  )
  return Transformer(model_config, rngs=nnx.Rngs(config.seed))


Log = Callable[[str], None]


def run_sft(config: AdditionConfig, data: AdditionData, *, log: Log = print
            ) -> tuple[nnx.GraphDef, TrainState]:
  """Supervised fine-tuning on the demonstrations (token-mean NLL of the answer tokens)."""
  tok = data.tokenizer
  optimizer = make_optimizer(OptimizerConfig(
    config.sft_learning_rate, warmup_steps=min(config.sft_warmup_steps, config.sft_steps // 4),
    schedule="cosine",
    total_steps=config.sft_steps, min_lr_ratio=0.1, weight_decay=0.01))
  graphdef, state = create_train_state(new_policy(config, len(tok)), optimizer, rng=config.seed)
  step = make_train_step(sft_loss, graphdef, optimizer, count_fn=sft_token_count)
  length = config.prompt_length + config.max_new_tokens
  batches = BatchIterator(data.sft_records, config.sft_batch_size, seed=config.seed,
                          collate=collator("sft", pad_id=tok.pad_token_id, buckets=[length]))
  t0 = time.perf_counter()
  for i in range(config.sft_steps):
    state, metrics = step(state, next(batches))
    if (i + 1) % max(1, config.sft_steps // 5) == 0:
      log(f"  [{time.perf_counter() - t0:.0f}s]"
          f"  sft step {i + 1:5d}  nll {float(metrics['nll']):.4f}")
  return graphdef, state


def make_grpo_trainer(config: AdditionConfig, data: AdditionData, graphdef: nnx.GraphDef,
                      sft_state: TrainState) -> tuple[GRPOTrainer, TrainState]:
  """The GRPO trainer and a fresh train state (RL optimizer) holding the SFT parameters."""
  tok = data.tokenizer
  optimizer = make_optimizer(OptimizerConfig(config.rl_learning_rate, warmup_steps=5))
  policy = nnx.merge(graphdef, sft_state.params, sft_state.frozen)
  trainable: Any = nnx.Param
  if config.lora_rank:
    lora = LoRAConfig(rank=config.lora_rank, alpha=2 * config.lora_rank)
    policy, trainable = add_lora(policy, lora, rngs=nnx.Rngs(config.seed + 4)), lora_trainable
  rl_graphdef, state = create_train_state(policy, optimizer, rng=config.seed + 1,
                                          trainable=trainable)
  trainer = GRPOTrainer(rl_graphdef, optimizer, config.grpo_config(), exact_match_reward, tok,
                        stop_tokens=[tok.eos_token_id], pad_id=tok.pad_token_id)
  return trainer, trainer.init_state(state)


def run_grpo(config: AdditionConfig, data: AdditionData, trainer: GRPOTrainer,
             state: TrainState, *, log: Log = print) -> TrainState:
  """`rl_steps` GRPO steps on batches of training prompts (G samples each)."""
  tok = data.tokenizer
  prompts = BatchIterator(
    data.rl_records, config.rl_prompts_per_step, seed=config.seed + 2,
    collate=collator("prompt", pad_id=tok.pad_token_id, buckets=[config.prompt_length]))
  key = jax.random.key(config.seed + 3)
  for i in range(config.rl_steps):
    state, metrics = trainer.step(state, next(prompts), jax.random.fold_in(key, i))
    if (i + 1) % max(1, config.rl_steps // 6) == 0:
      kl = f"kl {metrics['kl']:.4f}  " if "kl" in metrics else ""  # kl_coef = 0: no reference
      log(f"  grpo step {i + 1:4d}  reward {metrics['reward_mean']:.3f}  {kl}"
          f"entropy {metrics['entropy']:.3f}  "
          f"zero-var groups {metrics['zero_variance_groups']:.2f}")
  return state


def evaluate(trainer: GRPOTrainer, state: TrainState, data: AdditionData, seed: int
             ) -> float:
  """Greedy exact-match accuracy on the held-out problems."""
  return trainer.evaluate(state, data.eval_batch, jax.random.key(seed))["accuracy"]


def run(config: AdditionConfig, *, log: Log = print) -> dict[str, float]:
  """The whole pipeline; returns accuracies (0..1) and stage timings (seconds)."""
  times, start = {}, time.perf_counter()
  data = build_data(config)
  log(f"addition of {config.digits}-digit numbers; demonstrations correct "
      f"{100 * data.demo_accuracy:.1f}% (carry forgotten with p={config.forget_prob}); "
      f"carry-free held-out problems {100 * data.carry_free_fraction:.1f}%")
  t = time.perf_counter()
  graphdef, sft_state = run_sft(config, data, log=log)
  times["sft_seconds"] = time.perf_counter() - t
  trainer, state = make_grpo_trainer(config, data, graphdef, sft_state)
  t = time.perf_counter()
  before = evaluate(trainer, state, data, config.seed)
  sampled = trainer.evaluate(state, data.eval_batch, jax.random.key(config.seed),
                             temperature=config.temperature)["accuracy"]
  log(f"after SFT: greedy accuracy {100 * before:.1f}%  (sampled at T={config.temperature}: "
      f"{100 * sampled:.1f}%)")
  times["eval_seconds"] = time.perf_counter() - t
  t = time.perf_counter()
  state = run_grpo(config, data, trainer, state, log=log)
  times["rl_seconds"] = time.perf_counter() - t
  t = time.perf_counter()
  after = evaluate(trainer, state, data, config.seed)
  times["eval_seconds"] += time.perf_counter() - t
  times["total_seconds"] = time.perf_counter() - start
  log(f"after GRPO: greedy accuracy {100 * after:.1f}%  (gain {100 * (after - before):+.1f} "
      f"points)")
  return {"before": before, "after": after, "sampled_before": sampled,
          "demo_accuracy": data.demo_accuracy, **times}
