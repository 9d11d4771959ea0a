"""LoRA through the runner (`--set model.lora.rank=...`): SFT, DPO and PPO with a critic of its
own adapters train the adapters alone; checkpoints leave the base out; the final model/ is the
merged checkpoint with the PEFT adapter beside it."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tiny_experiment import grpo_config, sft_config, sft_rows  # noqa: E402

from rljax.experiment.config import LoggingSection  # noqa: E402
from rljax.experiment.logging import read_metrics  # noqa: E402
from rljax.experiment.runner import run_experiment  # noqa: E402
from rljax.models.adapters import read_adapter_config  # noqa: E402
from rljax.models.lora import LoRAConfig  # noqa: E402
from rljax.rollout.sampling import SamplingConfig  # noqa: E402
from rljax.train.onpolicy import UpdateConfig  # noqa: E402
from rljax.train.ppo import PPOConfig  # noqa: E402

LORA = ["model.lora.rank=4", "model.lora.alpha=8", "model.lora.target_modules=[\"q\",\"v\",\"down\"]"]


def preference_rows() -> list[dict]:
  return [{"prompt": r["prompt"], "chosen": r["response"], "rejected": "hello"} for r in sft_rows()]


@pytest.mark.parametrize("algorithm", ["sft", "dpo"])
def test_supervised_lora_run_trains_adapters_and_saves_them_in_peft_format(tmp_path, algorithm):
  out = tmp_path / algorithm
  config = sft_config(str(out), plot=False)
  if algorithm == "dpo":
    config = dataclasses.replace(config, algorithm="dpo", data=dataclasses.replace(
      config.data, train=preference_rows, eval=preference_rows))
  run_experiment(config, LORA + ["steps=3", "model.lora.dropout=0.1"])
  records = read_metrics(str(out))
  assert records[-1]["loss"] < records[0]["loss"] and all(np.isfinite(r["loss"]) for r in records)
  assert read_adapter_config(out / "model" / "adapter", 2) == LoRAConfig(
    rank=4, alpha=8.0, dropout=0.1, target_modules=("q", "v", "down"))
  assert (out / "model" / "model.safetensors").exists()  # the merged checkpoint
  meta = json.loads((out / "checkpoints" / "3" / "meta" / "metadata").read_text())
  assert meta["frozen_base"]["path"].startswith("model.config")


def test_ppo_with_qlora_policy_and_critic_adapters(tmp_path):
  out = str(tmp_path / "ppo")
  base = grpo_config(out)
  config = dataclasses.replace(
    base, algorithm="ppo", steps=2, eval_k=1, data=dataclasses.replace(base.data, eval=None),
    ppo=PPOConfig(sampling=SamplingConfig(num_samples=2, max_new_tokens=4),
                  update=UpdateConfig(num_epochs=1), kl_coef=0.05),
    logging=LoggingSection(out_dir=out, progress=False, tensorboard=False, plot=False,
                           save_model=False))
  run_experiment(config, LORA + ["model.lora.critic=adapters", "model.lora.quantize=int8"])
  records = read_metrics(out)
  assert [r["step"] for r in records] == [1, 2]
  assert all(np.isfinite(r["value_loss"]) and np.isfinite(r["loss"]) for r in records)
  assert abs(records[0]["kl"]) < 1e-6  # the reference: the base, the adapters fresh
