"""SmolLM2-135M-Instruct (converted from GGUF, see the README) on arithmetic word problems.

  word_problems.py  templated word problems with random numbers (train / eval splits, worked
                    answers, preference pairs); generated in code, no downloads
  grpo.py           `rljax train experiments/smollm2/grpo.py`: GRPO with the verifiable
                    math-answer reward (+ a small format reward)
  dpo.py            `rljax train experiments/smollm2/dpo.py`: DPO on correct vs. wrong worked
                    answers

Both read the converted model directory from $RLJAX_SMOLLM2_DIR (default "smollm2", the output
directory of the README's `rljax convert` command). They are sized for a GPU; the docstrings give
the `--set` overrides for a few-step CPU smoke run and its measured time.
"""
