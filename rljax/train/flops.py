"""Analytic FLOPs of an on-policy update, for the `mfu` metric (model FLOPs utilisation).

XLA's `cost_analysis()` counts a scanned layer body once (it undercounts by the number of
layers), so the count is analytic. For B rows of T = P + N tokens (N completion positions), a
Transformer with L layers, width D, MLP width F, H query / K key-value heads of width d and
vocabulary V, one forward pass costs (a multiply-add is 2 FLOPs)

    layers     2 · B·T · L · (D·H·d + 2·D·K·d + H·d·D + 3·D·F)      projections and SwiGLU
    attention  2 · 2·B·H·T² · d · L                                 QKᵀ and PV over all T×T
    logits     2 · B·N · D · V                                      completion positions only

the backward pass twice that, and the fused log-prob backward (`logprobs_from_hidden`)
recomputes the logits once more; with `remat` the layers' forward runs again in the backward:

    update = 3 · (layers + attention + logits) + logits  [+ layers + attention with remat]

These are the FLOPs the update executes: the dense attention computes the masked half of
causal attention too. Where the model runs the blockwise core instead
(`rljax.models.attention.uses_blockwise`), the attention term counts the blocks it computes —
num·(num+1)/2 of num² for num blocks per (padded) row — and its backward is 2.5x its forward
(the scores are recomputed: 5 matmuls per block pair against the forward's 2). The embedding
gather / scatter, norms, softmax and the optimizer are not counted. For the benchmark's 6.0M-parameter model and a 16 × (64 + 192) batch:
161.1 GFLOP.
"""

from __future__ import annotations

from typing import Any

from rljax.models.attention import uses_blockwise


def attention_flops(config: Any, rows: int, length: int) -> tuple[float, float]:
  """(forward, backward) FLOPs of the attention core over all layers for rows of `length`."""
  c = config
  d = c.head_dim or c.hidden_size // c.num_heads
  dense = 4.0 * rows * c.num_heads * length * length * d * c.num_layers
  if not uses_blockwise(c, length):
    return dense, 2.0 * dense
  size = min(c.attention_block, length)
  num = -(-length // size)
  forward = dense * (num * size / length) ** 2 * (num + 1) / (2 * num)
  return forward, 2.5 * forward


def forward_flops(config: Any, rows: int, prompt_length: int, completion_length: int
                  ) -> dict[str, float]:
  """{"layers", "attention", "logits"} FLOPs of one forward pass (module doc)."""
  c = config
  d = c.head_dim or c.hidden_size // c.num_heads
  kv = c.num_kv_heads or c.num_heads
  tokens = rows * (prompt_length + completion_length)
  per_layer = (c.hidden_size * c.num_heads * d + 2 * c.hidden_size * kv * d
               + c.num_heads * d * c.hidden_size + 3 * c.hidden_size * c.intermediate_size)
  return {
    "layers": 2.0 * tokens * c.num_layers * per_layer,
    "attention": attention_flops(c, rows, prompt_length + completion_length)[0],
    "logits": 2.0 * rows * completion_length * c.hidden_size * c.vocab_size,
  }


def update_flops(config: Any, rows: int, prompt_length: int, completion_length: int, *,
                 logits_recompute: bool = True) -> float:
  """FLOPs of one policy update: forward + backward, plus the fused log-prob backward's
  recompute of the logits (`logits_recompute`)."""
  f = forward_flops(config, rows, prompt_length, completion_length)
  total = 3.0 * (f["layers"] + f["logits"]) + (f["logits"] if logits_recompute else 0.0)
  return total + _backbone_backward_extra(config, f, rows, prompt_length + completion_length)


def value_update_flops(config: Any, rows: int, prompt_length: int, completion_length: int
                       ) -> float:
  """FLOPs of one critic update (PPO's `ValueModel`: the backbone's layers forward + backward,
  no logits; the scalar head is negligible)."""
  f = forward_flops(config, rows, prompt_length, completion_length)
  return 3.0 * f["layers"] + _backbone_backward_extra(config, f, rows,
                                                      prompt_length + completion_length)


def _backbone_backward_extra(config: Any, f: dict[str, float], rows: int, length: int) -> float:
  """Attention forward + backward, plus the forward that `remat` runs again in the backward."""
  forward, backward = attention_flops(config, rows, length)
  total = forward + backward
  if getattr(config, "remat", False):
    total += f["layers"] + forward
  return total
