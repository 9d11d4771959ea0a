"""PNG curves of a run: one panel per informative quantity, against the step.

PANELS lists the quantities (reward, accuracy, loss, KL, entropy, response length, clip
fraction, grad norm, then any other evaluation metric) and the metrics each may show. A panel
shows only the series that carry information:

  * a constant series is left out (`is_constant`: KL at β = 0, a GRPO loss of ±1e-7 when every
    group's rewards are equal, a clip fraction that stays 0), and a panel with none is dropped;
  * a series identical to an earlier one of its panel (eval/accuracy and eval/reward_mean under a
    0/1 verifier) is drawn once, labelled with both names, instead of hiding behind it.
"""

from __future__ import annotations

import math
import sys
from typing import Any

PANELS: tuple[tuple[str, tuple[str, ...]], ...] = (
  ("reward", ("reward_mean", "eval/reward_mean", "rewards_chosen", "rewards_rejected",
              "reward_margin")),
  ("accuracy", ("eval/accuracy", "eval/pass@*", "reward_accuracy", "eval/reward_accuracy")),
  ("loss", ("loss", "nll", "value_loss", "eval/loss", "eval/nll")),
  ("KL", ("kl", "approx_kl", "first_kl")),
  ("entropy", ("entropy",)),
  ("response length", ("response_length",)),
  ("clip fraction", ("clipfrac", "vf_clipfrac")),
  ("grad norm", ("grad_norm",)),
  ("evaluation", ("eval/*",)),  # every evaluation metric not shown above
)
RELATIVE_TOLERANCE = 1e-6  # a series whose range is below this (relative to max(1, |x|)) is flat


def _series(records: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
  steps, values = [], []
  for r in records:
    v = r.get(key)
    if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
      steps.append(r["step"])
      values.append(float(v))
  return steps, values


def is_constant(values: list[float]) -> bool:
  """Whether a series is flat: its range is at most 1e-6 · max(1, max |x|) (so ±1e-7 is)."""
  if not values:
    return True
  scale = max(1.0, max(abs(v) for v in values))
  return max(values) - min(values) <= RELATIVE_TOLERANCE * scale


def _matches(key: str, pattern: str) -> bool:
  return key.startswith(pattern[:-1]) if pattern.endswith("*") else key == pattern


def select_panels(records: list[dict[str, Any]]
                  ) -> list[tuple[str, list[tuple[str, list[int], list[float]]]]]:
  """`[(panel title, [(label, steps, values), ...]), ...]`: the informative series of each
  panel (module docstring), in PANELS order."""
  keys = list(dict.fromkeys(k for r in records for k in r))
  used: set[str] = set()
  panels = []
  for title, patterns in PANELS:
    lines: list[tuple[str, list[int], list[float]]] = []
    for pattern in patterns:
      for key in sorted(k for k in keys if _matches(k, pattern) and k not in used):
        used.add(key)
        steps, values = _series(records, key)
        if is_constant(values):
          continue
        twin = next((i for i, (_, s, v) in enumerate(lines) if s == steps and v == values), None)
        if twin is None:
          lines.append((key, steps, values))
        else:
          label, s, v = lines[twin]
          lines[twin] = (f"{label} = {key}", s, v)
    if lines:
      panels.append((title, lines))
  return panels


def plot_curves(records: list[dict[str, Any]], path: str, *, title: str = "",
                columns: int = 4) -> bool:
  """Writes the curves of `records` (metrics.jsonl records) to the PNG `path`.

  One panel per quantity that has an informative series (`select_panels`), at most `columns`
  to a row.
  Returns False (with a message on stderr) when matplotlib is not installed or there is nothing
  to plot.
  """
  panels = select_panels(records)
  if not panels:
    print("rljax: no varying metric to plot; no curves.png written.", file=sys.stderr)
    return False
  try:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator
  except ImportError:
    print("rljax: matplotlib is not installed; no plot written (pip install matplotlib).",
          file=sys.stderr)
    return False
  rows = math.ceil(len(panels) / columns)
  columns = math.ceil(len(panels) / rows)  # balanced rows: 5 panels are 3 + 2, not 4 + 1
  fig, axes = plt.subplots(rows, columns, figsize=(4.0 * columns, 2.9 * rows + 0.5),
                           squeeze=False)
  for ax in axes.flat[len(panels):]:
    ax.set_visible(False)
  for ax, (name, lines) in zip(axes.flat, panels):
    for label, steps, values in lines:
      ax.plot(steps, values, marker="o" if len(steps) <= 30 else None, markersize=3,
              linewidth=1.4, label=label)
    ax.set_title(name, fontsize=11)
    ax.set_xlabel("step", fontsize=9)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps are whole numbers
    ax.tick_params(labelsize=8)
    ax.grid(alpha=0.3)
    ax.spines[["top", "right"]].set_visible(False)
    ax.legend(fontsize=7, frameon=False)
  if title:
    fig.suptitle(title, fontsize=12)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return True
