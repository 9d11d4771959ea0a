"""PNG curves of a run: reward, KL, loss (and evaluation metrics) against the step."""

from __future__ import annotations

import math
import sys
from typing import Any

PANELS = (
  ("reward", ("reward_mean", "rewards_chosen", "reward_margin")),
  ("KL", ("kl", "approx_kl")),
  ("loss", ("loss", "nll", "value_loss")),
  ("accuracy", ("reward_accuracy",)),
  ("evaluation", ()),  # every "eval/..." metric
)


def _series(records: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
  steps, values = [], []
  for r in records:
    v = r.get(key)
    if isinstance(v, (int, float)) and math.isfinite(v):
      steps.append(r["step"])
      values.append(float(v))
  return steps, values


def plot_curves(records: list[dict[str, Any]], path: str, *, title: str = "") -> bool:
  """Writes the curves of `records` (metrics.jsonl records) to the PNG `path`.

  One panel per group of PANELS that has data. Returns False (with a message on stderr) when
  matplotlib is not installed or there is nothing to plot.
  """
  try:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
  except ImportError:
    print("rljax: matplotlib is not installed; no plot written (pip install matplotlib).",
          file=sys.stderr)
    return False
  keys = {k for r in records for k in r}
  panels = []
  for name, wanted in PANELS:
    chosen = [k for k in wanted if k in keys] if wanted else sorted(
      k for k in keys if k.startswith("eval/"))
    if chosen:
      panels.append((name, chosen))
  if not panels:
    print("rljax: no reward / KL / loss metrics to plot.", file=sys.stderr)
    return False
  fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.2), squeeze=False)
  for ax, (name, chosen) in zip(axes[0], panels):
    for key in chosen:
      steps, values = _series(records, key)
      ax.plot(steps, values, marker="o" if len(steps) < 30 else None, markersize=3, label=key)
    ax.set_title(name)
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
  if title:
    fig.suptitle(title)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return True
