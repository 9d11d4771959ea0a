"""Multi-digit addition learned from scratch: SFT on careless demonstrations, then RL.

  task.py      problems, the careless demonstrator, the character tokenizer, the exact-match reward
  pipeline.py  model, SFT stage, GRPO stage, greedy evaluation (all through rljax)
  main.py      `python experiments/addition/main.py`: the whole run, accuracy before/after RL
"""
