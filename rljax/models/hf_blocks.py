"""Block-wise reads of Hugging Face safetensors tensors in the rljax layout.

`jax.make_array_from_callback` asks for one block (a tuple of slices over the rljax shape) per
device; `BlockReader.callback` answers with only the rows/columns of the HF tensor(s) behind that
block (`safe_open(...).get_slice`), converted to the rljax layout block-wise. The layouts are those
of `hf_weights.hf_to_rljax_layout` (the tests check that both agree on random blocks).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from typing import Any

import jax
import ml_dtypes  # noqa: F401  (registers bfloat16 with numpy for safetensors' numpy reader)
import numpy as np
import safetensors
from safetensors import safe_open

from rljax.models.config import ModelConfig
from rljax.models.hf_weights import TOP_NAME_TO_HF, hf_layer_name, rljax_to_hf_layout


def open_safetensors(file: str) -> Any:
  """`safe_open(file)` (numpy); a damaged or truncated file raises a ValueError naming it."""
  try:
    return safe_open(file, framework="numpy")
  except (safetensors.SafetensorError, OSError) as e:
    raise ValueError(f"{file}: not a readable safetensors file ({e}); the download or copy may "
                     "be incomplete.") from e


def _norm(index: tuple[slice, ...], shape: tuple[int, ...]) -> tuple[slice, ...]:
  """Index tuple with explicit start/stop (make_array_from_callback may pass `slice(None)`)."""
  index = tuple(index) + (slice(None),) * (len(shape) - len(index))
  return tuple(slice(*s.indices(n)[:2]) for s, n in zip(index, shape))


def _heads(s: slice, head_dim: int) -> slice:
  """The rows [start * head_dim, stop * head_dim) holding heads s.start..s.stop-1."""
  return slice(s.start * head_dim, s.stop * head_dim)


def _read_block(tensor: Any, name: str, index: tuple[slice, ...], c: ModelConfig) -> np.ndarray:
  """Block `index` of one layer's rljax parameter `name`, read from its HF tensor slice.

  `tensor` is a safetensors slice (`get_slice`): only the rows/columns of the block are read.
  The layouts are those of `hf_weights.hf_to_rljax_layout` (tested to agree).
  """
  hd = c.head_dim
  if name in ("q_proj", "k_proj", "v_proj"):  # rljax [D, n, Dh] ← HF [n*Dh, D]
    sd, sn, sh = index
    block = tensor[_heads(sn, hd), sd]
    return block.T.reshape(sd.stop - sd.start, sn.stop - sn.start, hd)[:, :, sh]
  if name in ("q_bias", "k_bias", "v_bias"):  # rljax [n, Dh] ← HF [n*Dh]
    sn, sh = index
    return tensor[_heads(sn, hd)].reshape(sn.stop - sn.start, hd)[:, sh]
  if name == "o_proj":  # rljax [H, Dh, D] ← HF [D, H*Dh]
    sn, sh, sd = index
    block = tensor[sd, _heads(sn, hd)]
    return block.T.reshape(sn.stop - sn.start, hd, sd.stop - sd.start)[:, sh, :]
  if name in ("gate_proj", "up_proj", "down_proj"):  # [D, F] ← HF [F, D]; down [F, D] ← [D, F]
    return tensor[index[1], index[0]].T
  return tensor[index]


class BlockReader(contextlib.ExitStack):
  """Open safetensors files of one directory; reads blocks of rljax parameters from them."""

  def __init__(self, path: str, mapping: dict[str, str], config: ModelConfig,
               stored: dict[str, str] | None = None):
    """`mapping`: {HF name: file}; `stored`: {HF name: the name in the file} where they differ
    (a multimodal checkpoint's text model, `hf_weights.text_weight_names`)."""
    super().__init__()
    self.path, self.mapping, self.config = path, mapping, config
    self.stored = stored or {}
    self._files: dict[str, Any] = {}

  def slice_of(self, hf_name: str) -> Any:
    file = self.mapping[hf_name]
    if file not in self._files:
      self._files[file] = self.enter_context(open_safetensors(os.path.join(self.path, file)))
    return self._files[file].get_slice(self.stored.get(hf_name, hf_name))

  def check_shape(self, hf_name: str, expected: tuple[int, ...]) -> None:
    shape = tuple(self.slice_of(hf_name).get_shape())
    if shape != tuple(expected):
      raise ValueError(
        f"tensor {hf_name!r} in {self.mapping[hf_name]!r} has shape {shape}, "
        f"expected {tuple(expected)}"
      )

  def callback(self, path: tuple[str, ...], shape: tuple[int, ...], dtype: Any) -> Callable:
    """index (over the rljax shape) → numpy block, for `jax.make_array_from_callback`."""
    c = self.config
    if path[0] != "layers":
      hf_name = TOP_NAME_TO_HF[path[0]]
      return lambda index: np.asarray(
        _read_block(self.slice_of(hf_name), path[0], _norm(index, shape), c), dtype
      )
    name = path[1]

    def read(index: tuple[slice, ...]) -> np.ndarray:
      index = _norm(index, shape)
      blocks = [
        _read_block(self.slice_of(hf_layer_name(name, layer, c)), name, index[1:], c)
        for layer in range(index[0].start, index[0].stop)
      ]
      return np.stack(blocks).astype(dtype, copy=False)

    return read


def hf_shapes(path: tuple[str, ...], shape: tuple[int, ...], c: ModelConfig) -> dict[str, tuple]:
  """{HF name: expected HF shape} of the tensors behind rljax parameter `path`."""
  if path[0] != "layers":
    return {TOP_NAME_TO_HF[path[0]]: tuple(shape)}
  name = path[1]
  one = jax.ShapeDtypeStruct(shape[1:], np.float32)
  hf_shape = tuple(jax.eval_shape(lambda x: rljax_to_hf_layout(name, x, c), one).shape)
  return {hf_layer_name(name, layer, c): hf_shape for layer in range(shape[0])}
