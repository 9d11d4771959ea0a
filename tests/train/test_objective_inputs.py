"""The supervised objectives and count functions name what is wrong with a batch: missing keys
(a ValueError listing them) and float token ids (named by their key). Errors only: nothing is
compiled."""

from __future__ import annotations

import jax.numpy as jnp
import pytest
from flax import nnx

from rljax.models.config import ModelConfig
from rljax.models.heads import RewardModel
from rljax.models.transformer import Transformer
from rljax.train.objectives import dpo_objective, pair_count, sft_loss, sft_token_count
from rljax.train.preference import cpo_objective, example_count, kto_objective
from rljax.train.reward_modeling import ranking_count, reward_pair_objective

POLICY = Transformer(ModelConfig(vocab_size=16, hidden_size=8, intermediate_size=16,
                                 num_layers=1, num_heads=2), rngs=nnx.Rngs(0))
ROWS = {"input_ids": jnp.ones((2, 4), jnp.int32), "attention_mask": jnp.ones((2, 4), bool),
        "loss_mask": jnp.ones((2, 4), bool)}
PAIRS = {f"{side}_{k}": v for side in ("chosen", "rejected") for k, v in ROWS.items()}
REFS = {"ref_chosen": jnp.zeros(2), "ref_rejected": jnp.zeros(2)}


@pytest.mark.parametrize("fn,batch,drop", [
  (sft_loss, ROWS, "loss_mask"),
  (sft_loss, ROWS, "input_ids"),
  (sft_token_count, ROWS, "loss_mask"),
  (pair_count, PAIRS, "chosen_input_ids"),
  (dpo_objective, {**PAIRS, **REFS}, "ref_rejected"),
  (cpo_objective, PAIRS, "rejected_loss_mask"),
  (kto_objective, {**ROWS, "label": jnp.ones(2, bool), "ref_logps": jnp.zeros(2)}, "label"),
  (example_count, ROWS, "input_ids"),
  (ranking_count, {"input_ids": jnp.ones((2, 2, 4), jnp.int32)}, "input_ids"),
])
def test_missing_batch_keys_are_listed(fn, batch, drop):
  partial = {k: v for k, v in batch.items() if k != drop}
  args = (partial,) if fn in (sft_token_count, pair_count, example_count, ranking_count) \
    else (POLICY, partial)
  with pytest.raises(ValueError, match=rf"needs batch keys \['{drop}'\]; the batch has"):
    fn(*args)


def test_float_token_ids_are_named_by_their_key():
  floats = {**ROWS, "input_ids": ROWS["input_ids"].astype(jnp.float32)}
  with pytest.raises(ValueError, match="`input_ids` must hold integer token ids; got dtype "
                                       "float32"):
    sft_loss(POLICY, floats)
  with pytest.raises(ValueError, match="`input_ids` must hold integer token ids"):
    POLICY(floats["input_ids"])
  pairs = {**PAIRS, **REFS, "rejected_input_ids": PAIRS["rejected_input_ids"] * 1.0}
  with pytest.raises(ValueError, match="`rejected_input_ids` must hold integer token ids"):
    dpo_objective(POLICY, pairs)
  rm = RewardModel.from_policy(POLICY, rngs=nnx.Rngs(1))
  with pytest.raises(ValueError, match="`rejected_input_ids` must hold integer token ids"):
    reward_pair_objective(rm, pairs)
