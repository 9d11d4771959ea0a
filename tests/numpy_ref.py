"""Plain-numpy float64 transcriptions shared by several test modules (loops on purpose)."""

import numpy as np


def np_masked_mean(x, m):
  x, m = np.asarray(x, np.float64), np.asarray(m, np.float64)
  n = m.sum()
  return 0.0 if n == 0 else (x * m).sum() / n


def np_masked_var(x, m, unbiased=True):
  x, m = np.asarray(x, np.float64), np.asarray(m, np.float64)
  n = m.sum()
  mu = np_masked_mean(x, m)
  d = n - 1 if unbiased else n
  return 0.0 if d <= 0 else (m * (x - mu) ** 2).sum() / d


def np_aggregate(L, m, mode, horizon=None):
  """The five aggregation modes, written out row by row."""
  L, m = np.asarray(L, np.float64), np.asarray(m, np.float64)
  Bn, Tn = L.shape
  if mode == "token-sum":
    return sum(L[b, t] * m[b, t] for b in range(Bn) for t in range(Tn))
  if mode == "token-mean":
    n = m.sum()
    return 0.0 if n == 0 else np_aggregate(L, m, "token-sum") / n
  per_seq = []
  for b in range(Bn):
    n_b = m[b].sum()
    if n_b == 0:
      continue
    s = sum(L[b, t] * m[b, t] for t in range(Tn))
    if mode == "seq-mean-token-mean":
      per_seq.append(s / n_b)
    elif mode == "seq-mean-token-sum":
      per_seq.append(s)
    elif mode == "seq-mean-token-sum-norm":
      per_seq.append(s / (Tn if horizon is None else horizon))
    else:
      raise ValueError(mode)
  return 0.0 if not per_seq else sum(per_seq) / len(per_seq)
