"""Console progress: a tqdm bar with ETA and the key metrics of the latest step."""

from __future__ import annotations

import sys
from typing import Any

KEY_METRICS = ("loss", "reward_mean", "kl", "reward_accuracy", "nll", "grad_norm",
               "eval/accuracy")


def _short(value: float) -> str:
  return f"{value:.4g}"


class Progress:
  """`Progress(total, initial, enabled)`; `update(step, metrics)` advances the bar to `step`
  and shows the key metrics present; `write(text)` prints above the bar."""

  def __init__(self, total: int, *, initial: int = 0, enabled: bool = True):
    self._bar = None
    if enabled:
      from tqdm.auto import tqdm

      self._bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True,
                       file=sys.stderr)
    self._step = initial

  def update(self, step: int, metrics: dict[str, Any]) -> None:
    if self._bar is None:
      return
    shown = {k.split("/")[-1] if k.startswith("eval/") else k: _short(float(metrics[k]))
             for k in KEY_METRICS if k in metrics}
    self._bar.set_postfix(shown, refresh=False)
    self._bar.update(step - self._step)
    self._step = step

  def write(self, text: str) -> None:
    if self._bar is None:
      print(text, file=sys.stderr)
    else:
      self._bar.write(text, file=sys.stderr)

  def close(self) -> None:
    if self._bar is not None:
      self._bar.close()
