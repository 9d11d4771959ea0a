"""Regenerates the golden parity fixtures under tests/models/fixtures/<family>/ (needs torch).

For each family a tiny random transformers model (fixed seed, fp32, eager attention) is built,
its weights are re-drawn at a scale that makes the logits O(1) (transformers' 0.02 init makes
every model look alike), and the script saves:

  config.json, model.safetensors   the Hugging Face directory (save_pretrained)
  inputs.npz                       input_ids [B, T], attention_mask [B, T] (row 1 left-padded),
                                   position_ids [B, T] (cumsum(mask) - 1 clipped at 0),
                                   logits [B, T, V] float32 from transformers' PyTorch forward

and, for LoRA, `lora_llama/`: a PEFT adapter (adapter_config.json, adapter_model.safetensors,
peft's own save_pretrained) on the `llama` fixture, r = 4, all linear layers, rsLoRA, its A and
B re-drawn ~ N(0, 0.2²) (PEFT's B = 0 would make it the base), and inputs.npz with the logits of
the adapted model (PEFT's forward) and of the merged one (`merge_and_unload`).

Run (torch is an optional extra, pinned to the CPU build; peft for the LoRA fixture):
  /work/venv/bin/pip install torch==2.13.0 peft
  python tests/models/make_parity_fixtures.py
"""

from __future__ import annotations

import os
import sys

import numpy as np

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")
SEED = 0
BATCH, LENGTH, PAD_LEFT = 3, 8, 3

_COMMON = dict(
  vocab_size=64,
  hidden_size=16,
  intermediate_size=32,
  num_hidden_layers=2,
  num_attention_heads=4,
  num_key_value_heads=2,
  head_dim=8,
  max_position_embeddings=64,
  rms_norm_eps=1e-6,
)
_LLAMA3_ROPE = {
  "rope_type": "llama3",
  "rope_theta": 10000.0,
  "factor": 4.0,
  "low_freq_factor": 1.0,
  "high_freq_factor": 4.0,
  "original_max_position_embeddings": 8,
}


# Gemma: a query_pre_attn_scalar that is not head_dim, a window shorter than the inputs, and
# soft-caps small enough that tanh is far from linear on O(1) scores and logits.
_GEMMA = dict(_COMMON, query_pre_attn_scalar=12, sliding_window=4)
# Gemma 3: two local layers then a global one; RoPE base 10k (local) / 1M ×8 linear (global).
_GEMMA3_ROPE = {
  "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
  "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1_000_000.0},
}
_GEMMA3 = dict(_GEMMA, num_hidden_layers=3, rope_parameters=_GEMMA3_ROPE,
               layer_types=["sliding_attention", "sliding_attention", "full_attention"])


def family_configs():
  """{family: transformers config} of the tiny models (imported lazily: transformers is heavy)."""
  import transformers as tf

  return {
    "llama": tf.LlamaConfig(**_COMMON, rope_parameters=dict(_LLAMA3_ROPE)),
    "smollm": tf.LlamaConfig(**_COMMON, tie_word_embeddings=True),
    "mistral": tf.MistralConfig(**_COMMON, sliding_window=4),
    "qwen2": tf.Qwen2Config(**_COMMON),
    "qwen3": tf.Qwen3Config(**_COMMON),
    "gemma2": tf.Gemma2Config(**_GEMMA, attn_logit_softcapping=2.0, final_logit_softcapping=3.0),
    "gemma3": tf.Gemma3TextConfig(**_GEMMA3),
    # Gemma3ForConditionalGeneration (4B+): a tiny vision tower the text model loads without.
    "gemma3_multimodal": tf.Gemma3Config(
      text_config=tf.Gemma3TextConfig(**_GEMMA3).to_dict(),
      vision_config=dict(model_type="siglip_vision_model", hidden_size=8, intermediate_size=8,
                         num_hidden_layers=1, num_attention_heads=2, image_size=8,
                         patch_size=4),
      mm_tokens_per_image=1,
    ),
  }


def make_inputs(vocab_size: int) -> dict[str, np.ndarray]:
  rng = np.random.default_rng(SEED)
  ids = rng.integers(1, vocab_size, size=(BATCH, LENGTH)).astype(np.int64)
  mask = np.ones((BATCH, LENGTH), np.int64)
  # Row 1: row 0's first LENGTH - PAD_LEFT tokens, left-padded with token 0.
  ids[1, :PAD_LEFT] = 0
  ids[1, PAD_LEFT:] = ids[0, : LENGTH - PAD_LEFT]
  mask[1, :PAD_LEFT] = 0
  positions = np.maximum(np.cumsum(mask, axis=-1) - 1, 0)
  return {"input_ids": ids, "attention_mask": mask, "position_ids": positions}


def randomize_(model, torch, norm_center: float = 1.0) -> None:
  """Weights ~ N(0, 0.3²); norm weights ~ norm_center + N(0, 0.1²) (Gemma's norms scale by 1 + w:
  center 0, the same effective scale); biases ~ N(0, 0.1²)."""
  gen = torch.Generator().manual_seed(SEED)
  with torch.no_grad():
    for name, p in sorted(model.named_parameters()):
      noise = torch.randn(p.shape, generator=gen, dtype=torch.float32)
      if "norm" in name:
        p.copy_(norm_center + 0.1 * noise)
      elif name.endswith("bias"):
        p.copy_(0.1 * noise)
      else:
        p.copy_(0.3 * noise)


def make_family(family: str, config) -> None:
  import torch
  import transformers as tf

  torch.manual_seed(SEED)
  config._attn_implementation = "eager"
  auto = (tf.AutoModelForImageTextToText if config.model_type == "gemma3"
          else tf.AutoModelForCausalLM)
  model = auto.from_config(config, dtype=torch.float32).eval()
  randomize_(model, torch, 0.0 if config.model_type.startswith("gemma") else 1.0)
  inputs = make_inputs(config.get_text_config().vocab_size)
  with torch.no_grad():
    out = model(
      input_ids=torch.from_numpy(inputs["input_ids"]),
      attention_mask=torch.from_numpy(inputs["attention_mask"]),
      position_ids=torch.from_numpy(inputs["position_ids"]),
      use_cache=False,
    )
  out_dir = os.path.join(FIXTURES, family)
  os.makedirs(out_dir, exist_ok=True)
  model.save_pretrained(out_dir, safe_serialization=True)
  gen_config = os.path.join(out_dir, "generation_config.json")
  if os.path.exists(gen_config):
    os.remove(gen_config)
  np.savez(
    os.path.join(out_dir, "inputs.npz"),
    input_ids=inputs["input_ids"].astype(np.int32),
    attention_mask=inputs["attention_mask"].astype(np.int32),
    position_ids=inputs["position_ids"].astype(np.int32),
    logits=out.logits.float().numpy(),
  )
  print(f"{family}: wrote {out_dir}")


LORA = dict(r=4, lora_alpha=8, lora_dropout=0.0, use_rslora=True, target_modules="all-linear")


def make_lora(base_family: str = "llama") -> None:
  import peft
  import torch
  import transformers as tf

  base_dir = os.path.join(FIXTURES, base_family)
  model = tf.AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32,
                                                  attn_implementation="eager").eval()
  model = peft.get_peft_model(model, peft.LoraConfig(task_type="CAUSAL_LM", **LORA))
  gen = torch.Generator().manual_seed(SEED + 1)
  with torch.no_grad():
    for name, p in sorted(model.named_parameters()):
      if "lora_" in name:
        p.copy_(0.2 * torch.randn(p.shape, generator=gen, dtype=torch.float32))
  inputs = make_inputs(model.config.vocab_size)
  torch_inputs = dict(input_ids=torch.from_numpy(inputs["input_ids"]),
                      attention_mask=torch.from_numpy(inputs["attention_mask"]),
                      position_ids=torch.from_numpy(inputs["position_ids"]), use_cache=False)
  with torch.no_grad():
    logits = model(**torch_inputs).logits.float().numpy()
  out_dir = os.path.join(FIXTURES, f"lora_{base_family}")
  model.peft_config["default"].base_model_name_or_path = base_family  # not this machine's path
  model.save_pretrained(out_dir, safe_serialization=True)
  readme = os.path.join(out_dir, "README.md")  # peft's model card template
  if os.path.exists(readme):
    os.remove(readme)
  with torch.no_grad():
    merged_logits = model.merge_and_unload()(**torch_inputs).logits.float().numpy()
  np.savez(os.path.join(out_dir, "inputs.npz"), logits=logits, merged_logits=merged_logits,
           **{k: v.astype(np.int32) for k, v in inputs.items()})
  print(f"lora_{base_family}: wrote {out_dir}")


def main() -> int:
  try:
    import torch  # noqa: F401
  except ImportError:
    print("torch is not installed: pip install torch==2.13.0 (CPU build)", file=sys.stderr)
    return 1
  for family, config in family_configs().items():
    make_family(family, config)
  make_lora()
  return 0


if __name__ == "__main__":
  sys.exit(main())
