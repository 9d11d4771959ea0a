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

These are the FLOPs the update executes (the masked half of causal attention included, as the
dense attention computes it); the embedding gather / scatter, norms, softmax and the optimizer
are not counted. For the benchmark's 6.0M-parameter model and a 16 × (64 + 192) batch:
161.1 GFLOP.
"""

from __future__ import annotations

from typing import Any


def forward_flops(config: Any, rows: int, prompt_length: int, completion_length: int
                  ) -> dict[str, float]:
  """{"layers", "attention", "logits"} FLOPs of one forward pass (module doc)."""
  c = config
  d = c.head_dim or c.hidden_size // c.num_heads
  kv = c.num_kv_heads or c.num_heads
  tokens = rows * (prompt_length + completion_length)
  per_layer = (c.hidden_size * c.num_heads * d + 2 * c.hidden_size * kv * d
               + c.num_heads * d * c.hidden_size + 3 * c.hidden_size * c.intermediate_size)
  t = prompt_length + completion_length
  return {
    "layers": 2.0 * tokens * c.num_layers * per_layer,
    "attention": 4.0 * rows * c.num_heads * t * t * d * c.num_layers,
    "logits": 2.0 * rows * completion_length * c.hidden_size * c.vocab_size,
  }


def update_flops(config: Any, rows: int, prompt_length: int, completion_length: int, *,
                 logits_recompute: bool = True) -> float:
  """FLOPs of one policy update: forward + backward, plus the fused log-prob backward's
  recompute of the logits (`logits_recompute`)."""
  f = forward_flops(config, rows, prompt_length, completion_length)
  total = 3.0 * sum(f.values()) + (f["logits"] if logits_recompute else 0.0)
  if getattr(config, "remat", False):
    total += f["layers"] + f["attention"]
  return total


def value_update_flops(config: Any, rows: int, prompt_length: int, completion_length: int
                       ) -> float:
  """FLOPs of one critic update (PPO's `ValueModel`: the backbone's layers forward + backward,
  no logits; the scalar head is negligible)."""
  f = forward_flops(config, rows, prompt_length, completion_length)
  total = 3.0 * (f["layers"] + f["attention"])
  if getattr(config, "remat", False):
    total += f["layers"] + f["attention"]
  return total
