"""Hugging Face checkpoint directories: `load_pretrained` / `save_pretrained`.

The layout is the one transformers and inference servers read and write:

  config.json                                  the transformers config (`ModelConfig.to_hf_dict`)
  model.safetensors                            all tensors, HF names and layouts, or
  model-00001-of-0000N.safetensors + model.safetensors.index.json   the same, sharded
  tokenizer.json, tokenizer_config.json, ...   read with `transformers.AutoTokenizer`

Loading builds the module abstractly (`nnx.eval_shape`: no random weights are ever allocated) and
creates each parameter with `jax.make_array_from_callback`: the callback for one device reads
only that device's block of the tensor from the safetensors file (`safe_open(...).get_slice`),
converting the HF layout to the rljax one block-wise (`hf_blocks`; `hf_weights` documents the
mapping). So a
parameter sharded over 8 devices is read as 8 disjoint blocks, never as a full copy per device.
Without a mesh, parameters are plain single-device arrays.

No pickle is ever read (`*.bin` / `*.pt` checkpoints are rejected), and transformers is only used
for tokenizers, with local files and `trust_remote_code=False`.

A Hugging Face Hub id ("HuggingFaceTB/SmolLM2-135M-Instruct") in place of a directory resolves
to its snapshot in the `huggingface_hub` cache (`resolve_model_dir`: downloaded when online and
missing; `HF_HUB_OFFLINE=1` only reads the cache; `HF_HUB_CACHE` moves it). Only the files above
are fetched, never pickles.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, Sharding
from safetensors.numpy import save_file

from rljax.models.config import ModelConfig
from rljax.models.hf_blocks import BlockReader, hf_shapes, open_safetensors
from rljax.models.hf_weights import (
  TOP_NAME_TO_HF,
  expected_hf_names,
  text_weight_names,
  to_hf_state_dict,
)
from rljax.models.lora import merged
from rljax.models.transformer import Transformer
from rljax.parallel.rules import Rules, current_rules, get_rules, named_shardings

CONFIG_FILE = "config.json"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
TOKENIZER_FILES = (
  "tokenizer.json",
  "tokenizer_config.json",
  "tokenizer.model",
  "vocab.json",
  "special_tokens_map.json",
)
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
# Multimodal architectures whose text model loads (its `text_config`, its text weights only).
TEXT_OF_MULTIMODAL = ("Gemma3ForConditionalGeneration",)
# Hub-friendly shard size (transformers 4.x's default; transformers 5 uses "50GB").
DEFAULT_MAX_SHARD_SIZE = "5GB"
# Tensors some checkpoints carry that the model recomputes (old Llama exports).
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
_SHARD_FILE = re.compile(r"model-\d{5}-of-\d{5}\.safetensors$")
# What a Hub snapshot is fetched with: config, safetensors weights, tokenizer and chat template.
HUB_FILE_PATTERNS = ("*.json", "*.safetensors", "*.model", "*.txt", "*.jinja")
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_TRUE = ("1", "ON", "YES", "TRUE")  # huggingface_hub's spelling of a true environment flag


# ----------------------------------------------------------------------------------------------
# Reading.
# ----------------------------------------------------------------------------------------------


def resolve_model_dir(name_or_path: str | os.PathLike) -> str:
  """A local directory as given; else a Hub repo id ("org/name") resolved to its snapshot
  directory through `huggingface_hub.snapshot_download`: from the cache (`HF_HUB_CACHE`, read
  when called) and, unless `HF_HUB_OFFLINE=1`, downloaded when missing.

  Raises:
    ValueError: neither an existing directory nor a repo id whose snapshot could be had (the
      message names it and the reason, e.g. not cached while offline).
  """
  path = os.fspath(name_or_path)
  if os.path.isdir(path) or not _REPO_ID.match(path):
    return path
  from huggingface_hub import snapshot_download

  offline = any(os.environ.get(k, "").upper() in _TRUE for k in ("HF_HUB_OFFLINE",
                                                                  "TRANSFORMERS_OFFLINE"))
  try:
    return snapshot_download(path, allow_patterns=list(HUB_FILE_PATTERNS),
                             cache_dir=os.environ.get("HF_HUB_CACHE") or None,
                             local_files_only=offline)
  except (OSError, ValueError) as e:
    mode = "offline (HF_HUB_OFFLINE=1): not in the cache" if offline else "not downloadable"
    raise ValueError(f"{path!r} is not a local directory, and as a Hugging Face Hub id it is "
                     f"{mode} ({type(e).__name__}: {e}).") from e


def read_json(file: str) -> dict[str, Any]:
  """The JSON object of `file`; a damaged file raises a ValueError naming it and the line."""
  try:
    with open(file, encoding="utf-8") as f:
      d = json.load(f)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    where = f"line {e.lineno}: " if isinstance(e, json.JSONDecodeError) else ""
    raise ValueError(f"{file}: {where}not valid JSON ({e}).") from e
  if not isinstance(d, dict):
    raise ValueError(f"{file}: expected a JSON object; got {type(d).__name__}.")
  return d


def load_config(path: str | os.PathLike, **overrides: Any) -> ModelConfig:
  """`ModelConfig` of a Hugging Face directory's config.json (architecture checked).

  Raises:
    ValueError: no config.json, an architecture other than a supported `*ForCausalLM`, or an
      unsupported `model_type` (the message names it).
  """
  file = os.path.join(os.fspath(path), CONFIG_FILE)
  if not os.path.isfile(file):
    raise ValueError(f"no {CONFIG_FILE} in {os.fspath(path)!r}")
  d = read_json(file)
  for arch in d.get("architectures") or []:
    if not arch.endswith("ForCausalLM") and arch not in TEXT_OF_MULTIMODAL:
      raise ValueError(
        f"unsupported architecture {arch!r} in {file}; load_pretrained reads *ForCausalLM "
        f"checkpoints (llama, mistral, qwen2, qwen3, gemma2, gemma3_text) and the text model of "
        f"{', '.join(TEXT_OF_MULTIMODAL)}"
      )
  return ModelConfig.from_hf(d, **overrides)


def load_tokenizer(path: str | os.PathLike) -> Any | None:
  """`transformers.AutoTokenizer` of a directory (local files only, no remote code), or None.

  None when the directory holds none of `TOKENIZER_FILES` (e.g. a weights-only export).
  """
  path = os.fspath(path)
  if not any(os.path.isfile(os.path.join(path, n)) for n in TOKENIZER_FILES):
    return None
  from transformers import AutoTokenizer

  return AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=False)


def weight_map(path: str | os.PathLike) -> dict[str, str]:
  """{HF tensor name: safetensors file name} of a directory (single file or sharded index).

  Raises:
    ValueError: no safetensors weights (pickle-based `*.bin` files are named and refused), an
      index naming a missing file, or a tensor the index maps to a file that lacks it.
  """
  path = os.fspath(path)
  single, index = os.path.join(path, SINGLE_FILE), os.path.join(path, INDEX_FILE)
  if os.path.isfile(single):
    with open_safetensors(single) as f:
      return {name: SINGLE_FILE for name in f.keys()}
  if os.path.isfile(index):
    mapping = dict(read_json(index).get("weight_map") or {})
    for file in sorted(set(mapping.values())):
      if not os.path.isfile(os.path.join(path, file)):
        raise ValueError(f"{INDEX_FILE} names {file!r}, which is not in {path!r}")
      with open_safetensors(os.path.join(path, file)) as f:
        keys = set(f.keys())
      absent = sorted(n for n, fl in mapping.items() if fl == file and n not in keys)
      if absent:
        raise ValueError(f"tensor {absent[0]!r} is mapped to {file!r} but that file lacks it")
    return mapping
  pickles = sorted(n for n in os.listdir(path) if n.endswith(PICKLE_SUFFIXES))
  if pickles:
    raise ValueError(
      f"{path!r} holds only pickle-based weights ({', '.join(pickles)}); rljax never unpickles. "
      "Convert them to safetensors first (e.g. transformers' "
      "`model.save_pretrained(out, safe_serialization=True)` in a trusted environment)."
    )
  raise ValueError(f"no {SINGLE_FILE} or {INDEX_FILE} in {path!r}")


def _resolve_placement(mesh: Any, rules: Rules | str | None) -> tuple[Any, Rules | None]:
  """(mesh, rules) to place parameters with; (None, None) for plain single-device arrays."""
  if mesh is None:
    try:
      ctx_mesh = jax.sharding.get_mesh()
    except ValueError:
      ctx_mesh = None
    if ctx_mesh is not None and not ctx_mesh.empty and current_rules():
      return ctx_mesh, current_rules() if rules is None else rules
    if rules is not None:
      raise ValueError("rules were given without a mesh; pass mesh= (or set one with jax.set_mesh)")
    return None, None
  if rules is None:
    rules = current_rules()
    if not rules:
      raise ValueError(
        "mesh was given without rules; pass rules= (e.g. 'fsdp' or rljax.parallel.rules.FSDP_RULES)"
      )
  return mesh, get_rules(rules) if isinstance(rules, str) else tuple(rules)


def load_pretrained(
  path: str | os.PathLike,
  *,
  dtype: Any = None,
  param_dtype: Any = None,
  mesh: Any = None,
  rules: Rules | str | None = None,
  strict: bool = True,
  **config_overrides: Any,
) -> tuple[Transformer, Any | None]:
  """Loads a Hugging Face directory as a `Transformer` and its tokenizer.

  Args:
    path: directory with config.json, model.safetensors (or sharded safetensors + index) and
      optionally tokenizer files, or a Hugging Face Hub id (`resolve_model_dir`).
    dtype: computation dtype (default float32).
    param_dtype: parameter dtype (default: the config's `dtype`/`torch_dtype`, else float32);
      values are cast block-wise on the host.
    mesh: place parameters sharded on this mesh, by their logical axes under `rules`. With no
      mesh, a mesh set by `jax.set_mesh` together with installed logical axis rules is used;
      otherwise parameters are plain single-device arrays.
    rules: a rule set or its name ("data", "fsdp", "fsdp_tp"); default the installed ones.
    strict: refuse tensors the model does not use (a tied model's `lm_head.weight` and
      `rotary_emb.inv_freq` buffers are always ignored).
    **config_overrides: other `ModelConfig` fields to set, e.g. `remat=True, remat_group=2`.

  Returns:
    (model, tokenizer); tokenizer is None when the directory has no tokenizer files.

  Raises:
    ValueError: missing config.json, unknown architecture / model_type, no safetensors
      (pickle `.bin` files are refused), a damaged file, and missing, unexpected or mis-shaped
      tensors (the message names the tensor and file); a Hub id that cannot be resolved.

  Example:
    >>> model, tokenizer = load_pretrained("HuggingFaceTB/SmolLM2-135M-Instruct", mesh=mesh,
    ...                                    rules="fsdp")
  """
  path = resolve_model_dir(path)
  overrides = {k: v for k, v in (("dtype", dtype), ("param_dtype", param_dtype)) if v is not None}
  config = load_config(path, **overrides, **config_overrides)
  stored = weight_map(path)
  names = text_weight_names(set(stored))  # a multimodal checkpoint's text model
  mapping = {name: stored[name_in_file] for name, name_in_file in names.items()}
  place_mesh, place_rules = _resolve_placement(mesh, rules)

  abstract = nnx.eval_shape(lambda: Transformer(config, rngs=nnx.Rngs(0)))  # no weights allocated
  _check_names(abstract, mapping, strict)
  graphdef, state = nnx.split(abstract)
  shardings = None if place_mesh is None else named_shardings(state, place_mesh, place_rules)
  with BlockReader(path, mapping, config, names) as reader:
    for var_path, var in nnx.to_flat_state(state):
      var_path = tuple(str(p) for p in var_path)
      shape, dt = tuple(var.shape), var.dtype
      for hf_name, hf_shape in hf_shapes(var_path, shape, config).items():
        reader.check_shape(hf_name, hf_shape)
      read = reader.callback(var_path, shape, dt)
      if shardings is None:
        value = jax.numpy.asarray(read(tuple(slice(None) for _ in shape)))
      else:
        sharding: Sharding = _flat_get(shardings, var_path)
        value = jax.make_array_from_callback(shape, sharding, read)
      var.set_value(value)
  return nnx.merge(graphdef, state), load_tokenizer(path)


def _flat_get(tree: Any, path: tuple[str, ...]) -> NamedSharding:
  for key in path:
    tree = tree[key]
  return tree.get_value() if isinstance(tree, nnx.Variable) else tree


def _check_names(model: Transformer, mapping: dict[str, str], strict: bool) -> None:
  expected = expected_hf_names(model)
  missing = [n for n in expected if n not in mapping]
  if missing:
    more = " ..." if len(missing) > 8 else ""
    raise ValueError(f"missing tensors: {missing[:8]}{more}")
  if strict:
    known = set(expected) | {TOP_NAME_TO_HF["lm_head"]}
    unexpected = sorted(
      n for n in mapping if n not in known and not n.endswith(_IGNORED_SUFFIXES)
    )
    if unexpected:
      raise ValueError(f"unexpected tensors (not used by this config): {unexpected[:8]}")


# ----------------------------------------------------------------------------------------------
# Writing.
# ----------------------------------------------------------------------------------------------

_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_size(size: int | str) -> int:
  """Bytes of `size`: an int, or a string like "5GB" (10⁹, as transformers) or "500MiB"."""
  if isinstance(size, int):
    if size <= 0:
      raise ValueError(f"max_shard_size must be positive, got {size}")
    return size
  match = re.fullmatch(r"\s*([0-9.]+)\s*([A-Za-z]*)\s*", str(size))
  unit = match.group(2).upper() if match else ""
  if not match or unit not in _UNITS or float(match.group(1)) <= 0:
    raise ValueError(f"max_shard_size must be an int or like '5GB' / '500MiB', got {size!r}")
  return int(float(match.group(1)) * _UNITS[unit])


def _plan_shards(tensors: dict[str, np.ndarray], max_bytes: int) -> list[list[str]]:
  """Greedy split of the tensors (in order) into files of at most `max_bytes` each.

  A single tensor larger than `max_bytes` gets a file of its own (as transformers does).
  """
  shards: list[list[str]] = [[]]
  size = 0
  for name, value in tensors.items():
    if shards[-1] and size + value.nbytes > max_bytes:
      shards.append([])
      size = 0
    shards[-1].append(name)
    size += value.nbytes
  return shards


def _remove_old_weights(path: str) -> None:
  """Deletes weight files of a previous save (single file, index, shards) in `path`."""
  for name in os.listdir(path):
    if name in (SINGLE_FILE, INDEX_FILE) or _SHARD_FILE.match(name):
      os.remove(os.path.join(path, name))


def save_pretrained(
  model: Transformer,
  tokenizer: Any | None,
  path: str | os.PathLike,
  *,
  max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
) -> list[str]:
  """Writes `model` (and `tokenizer`) as a Hugging Face directory readable by transformers.

  Writes config.json (`config.to_hf_dict()`, with `architectures`), the weights in HF names and
  layouts as model.safetensors, or as model-0000i-of-0000N.safetensors + index when larger than
  `max_shard_size`, and the tokenizer (`tokenizer.save_pretrained`) unless it is None. Weight
  files of an earlier save in `path` are replaced. Values are written in the parameters' dtype,
  bit for bit, so load → save → load is exact. A model with LoRA adapters is written merged
  (W + s · A B, `rljax.models.lora.merged`); `rljax.models.adapters.save_adapter` writes the
  adapters alone in PEFT's format.

  Sharded parameters are gathered to host memory tensor by tensor (`np.asarray` of a fully
  addressable array). Parameters sharded across processes (multi-host) are gathered with
  `jax.experimental.multihost_utils.process_allgather`, one tensor at a time, on every process
  (a collective: every process must call `save_pretrained`); process 0 alone writes the files
  (on a path it can reach, e.g. a shared file system), and all processes wait for it before
  returning. Each host needs host memory for the whole model.

  Args:
    model: an `rljax.models.transformer.Transformer`.
    tokenizer: a transformers tokenizer, or None.
    path: output directory (created if needed).
    max_shard_size: bytes per safetensors file, an int or a string ("5GB", "500MiB").

  Returns:
    The names of the weight files written (the same list on every process).
  """
  max_bytes = parse_size(max_shard_size)
  model = merged(model)
  multihost = _spans_processes(model)
  if multihost:
    model = _gathered_on_every_process(model)
  files = _write_pretrained(
    model, tokenizer, path, max_bytes, write=not multihost or jax.process_index() == 0
  )
  if multihost:
    from jax.experimental import multihost_utils

    multihost_utils.sync_global_devices("rljax.models.io.save_pretrained")
  return files


def _spans_processes(model: Transformer) -> bool:
  """True when some parameter has shards on devices of other processes."""
  return any(
    isinstance(var.get_value(), jax.Array) and not var.get_value().is_fully_addressable
    for _, var in nnx.to_flat_state(nnx.state(model, nnx.Param))
  )


def _gathered_on_every_process(model: Transformer) -> Transformer:
  """A copy of `model` whose parameters are full host (numpy) arrays, gathered tensor by tensor."""
  from jax.experimental import multihost_utils

  def gather(value: Any) -> Any:
    if isinstance(value, jax.Array) and not value.is_fully_addressable:
      return np.asarray(multihost_utils.process_allgather(value, tiled=True))
    return value

  graphdef, state = nnx.split(model)
  return nnx.merge(graphdef, jax.tree.map(gather, state))  # new variables: `model` is untouched


def _weight_file_names(num_shards: int) -> list[str]:
  if num_shards == 1:
    return [SINGLE_FILE]
  return [f"model-{i + 1:05d}-of-{num_shards:05d}.safetensors" for i in range(num_shards)]


def _write_pretrained(
  model: Transformer, tokenizer: Any | None, path: str | os.PathLike, max_bytes: int, *, write: bool
) -> list[str]:
  """Writes config.json, the safetensors file(s) (+ index) and the tokenizer into `path`.

  With `write=False` only the file names are computed (the other processes of a multi-host save).
  """
  tensors = to_hf_state_dict(model)
  shards = _plan_shards(tensors, max_bytes)
  files = _weight_file_names(len(shards))
  if not write:
    return files
  path = os.fspath(path)
  os.makedirs(path, exist_ok=True)
  with open(os.path.join(path, CONFIG_FILE), "w", encoding="utf-8") as f:
    json.dump(model.config.to_hf_dict(), f, indent=2)
  _remove_old_weights(path)
  for file, names in zip(files, shards):
    save_file({n: tensors[n] for n in names}, os.path.join(path, file), metadata={"format": "pt"})
  if len(shards) > 1:
    index = {
      "metadata": {"total_size": int(sum(v.nbytes for v in tensors.values()))},
      "weight_map": {n: file for file, names in zip(files, shards) for n in names},
    }
    with open(os.path.join(path, INDEX_FILE), "w", encoding="utf-8") as f:
      json.dump(index, f, indent=2)
  if tokenizer is not None:
    tokenizer.save_pretrained(path)
  return files

