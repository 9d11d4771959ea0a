"""Multi-turn rollouts: the policy decodes a turn, the environment answers, the answer's tokens
are appended to the slot's KV cache and the policy goes on — with the trained ids exactly the
sampled ones.

Each of the R = B·G rows (example i, sample j → row i·G + j) runs in a slot of the rollout engine
(`rljax.rollout.engine.EngineRun` with `hold=True`):

  prompt     env.reset's messages of example i, rendered once (`ChatTurns.prompt_tokens`; the
             samples of an example must get the same messages) and prefilled once for its G rows
  turn       the policy decodes until a stop token, a stop string or `turn_tokens`; the slot
             pauses (its blocks stay reserved)
  step       `safe_step(env, …)` on the paused rows, in a worker thread while the other slots
             go on decoding: errors and timeouts of the environment become observations. The
             action's text is its ids decoded with special tokens kept (tool-call tags may be
             special), its closing stop id dropped (`action_text`)
  observe    done, or `max_turns` policy turns taken: the row ends. Else the appended ids are
             `ChatTurns.close_turn` (the end-of-turn ids the policy did not sample) and
             `ChatTurns.observation_tokens` (the observation as the chat template's delta, or
             its exact `tokens`), written at the slot's own positions without re-prefilling the
             history; then the next turn. An observation that does not fit the row's token
             budget ends the row unappended, truncated.

The history is never decoded and re-encoded: the rollout's completion is the concatenation of
sampled turns and appended observations, and `policy_mask` marks exactly the sampled tokens.
Rows that run out of tokens (`sampling.max_new_tokens`, every turn and observation together)
are `truncated`; with `mask_truncated` their tokens leave the loss mask.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from rljax.agents.environment import Environment, safe_step
from rljax.agents.observations import LENGTH, ChatTurns
from rljax.ops._checks import check_int
from rljax.rollout.engine import EngineConfig, EngineRun
from rljax.rollout.generate import Rollout
from rljax.rollout.sampling import SamplingConfig

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class MultiTurnConfig:
  """The turns of a multi-turn rollout (`multi_turn_rollout`; a trainer's `multi_turn` section).

  Attributes:
    max_turns: the most policy turns of a row (4).
    turn_tokens: None, or the most tokens the policy samples in one turn (a turn cut there is
      still answered by the environment).
    env_timeout_s: the time limit of one environment step (60; None: none): a step past it
      becomes an error observation (`rljax.agents.safe_step`).
    mask_truncated: drop the tokens of truncated rows (out of tokens or turns) from the loss.
    prompt_length: the width the first prompts are left-padded to (None: the longest of the
      batch; a fixed width compiles the engine once).
  """

  max_turns: int = 4
  turn_tokens: int | None = None
  env_timeout_s: float | None = 60.0
  mask_truncated: bool = False
  prompt_length: int | None = None

  def __post_init__(self) -> None:
    check_int("max_turns", self.max_turns, 1)
    check_int("turn_tokens", self.turn_tokens, 1, optional=True)
    check_int("prompt_length", self.prompt_length, 1, optional=True)
    if self.env_timeout_s is not None and not (isinstance(self.env_timeout_s, (int, float))
                                               and self.env_timeout_s > 0):
      raise ValueError(f"`env_timeout_s` must be None or a number > 0; got "
                       f"{self.env_timeout_s!r}.")
    if not isinstance(self.mask_truncated, bool):
      raise ValueError(f"`mask_truncated` must be a bool; got {self.mask_truncated!r}.")


class Trajectories(NamedTuple):
  """Multi-turn rollouts (a pytree). R rows, P prompt and N completion tokens.

  Attributes:
    rollout: the `Rollout`; its completion is every token after the prompt (turns and
      observations), `completion_mask` up to the row's length, `logprobs` the behaviour
      log-probs of sampled tokens (0 at observations).
    policy_mask: [R, N] bool, the tokens the policy sampled (the loss mask; without the
      truncated rows' tokens under `mask_truncated`).
    turn_rewards: [R, N] float32, each environment step's reward at the last token of the turn
      it answered (0 elsewhere): per-turn (process-style) rewards for returns or GAE.
    turn_mask: [R, N] bool, True at the last token of each turn the environment answered.
    rewards: [R] float32, the sum of a row's turn rewards (its outcome).
    num_turns: [R] int32, policy turns taken.
    truncated: [R] bool, the row ended without the environment's done (out of tokens or of
      turns).
  """

  rollout: Rollout
  policy_mask: Array
  turn_rewards: Array
  turn_mask: Array
  rewards: Array
  num_turns: Array
  truncated: Array


class _Row:
  """Host record of one row: its state, turns, rewards and where its turns end."""

  def __init__(self, state: Any):
    self.state = state
    self.start = 0  # completion index of the current turn's first token
    self.turns = 0
    self.rewards: list[tuple[int, float]] = []  # (completion index of the turn's last token, r)
    self.truncated = False


def _prompt_batch(chat: ChatTurns, messages: list[list[dict]], g: int, tools: Any,
                  prompt_length: int | None) -> tuple[np.ndarray, np.ndarray]:
  """The examples' prompt ids, left-padded to `prompt_length` (None: the longest): [B, P]."""
  rows = []
  for i in range(0, len(messages), g):
    if any(messages[i + j] != messages[i] for j in range(1, g)):
      raise ValueError(f"`env.reset` must give the {g} samples of an example the same messages; "
                       f"rows {i}..{i + g - 1} differ.")
    rows.append(chat.prompt_tokens(messages[i], tools=tools))
  longest = max(len(r) for r in rows)
  p = longest if prompt_length is None else prompt_length
  if longest > p:
    raise ValueError(f"`prompt_length` ({p}) is shorter than the longest prompt ({longest} "
                     f"tokens).")
  tokens, mask = np.zeros((len(rows), p), np.int32), np.zeros((len(rows), p), bool)
  for i, r in enumerate(rows):
    tokens[i, p - len(r):], mask[i, p - len(r):] = r, True
  return tokens, mask


def multi_turn_rollout(
  model: Any,
  env: Environment,
  examples: Sequence[Any],
  key: Array,
  sampling: SamplingConfig,
  *,
  chat: ChatTurns,
  stop_tokens: int | Sequence[int],
  pad_id: int,
  config: MultiTurnConfig | None = None,
  seed: int = 0,
  stop_strings: str | Sequence[str] | None = None,
  tools: Sequence[dict] | None = None,
  engine: EngineConfig | None = None,
  mesh: Any = None,
) -> tuple[Trajectories, dict[str, float]]:
  """`sampling.num_samples` multi-turn trajectories of each of `examples` (see the module
  docstring), and the environment's metrics summed over its steps.

  Args:
    model: the policy (a rljax `Transformer`, or its (graphdef, params)).
    env: an `Environment`; `examples` are what its `reset` takes, one per prompt.
    key: the sampling key (token t of row r from fold_in(fold_in(key, r), t), as `generate`).
    sampling: the sampling options; `max_new_tokens` is a row's budget for all its turns and
      observations together.
    chat: the `ChatTurns` of the policy's tokenizer.
    stop_tokens: the ids that end a turn (the chat template's end of turn, EOS).
    pad_id: the id after a row's last token.
    config: the turns' limits (`MultiTurnConfig`; default its defaults).
    seed: env.reset's seed.
    stop_strings: strings that also end a turn (decoded from the turn's tokens only).
    tools: the JSON schemas rendered into the prompt (the HF `tools=` convention).
    engine, mesh: as `engine_generate`.
  """
  config = MultiTurnConfig() if config is None else config
  if not isinstance(config, MultiTurnConfig):
    raise ValueError(f"`config` must be a MultiTurnConfig; got {type(config).__name__}.")
  max_turns = config.max_turns
  if not isinstance(chat, ChatTurns):
    raise ValueError(f"`chat` must be a ChatTurns; got {type(chat).__name__}.")
  examples = list(examples)
  if not examples:
    raise ValueError("`examples` must hold at least one example.")
  g = sampling.num_samples
  messages, states = env.reset([x for x in examples for _ in range(g)], seed=seed)
  tokens, mask = _prompt_batch(chat, messages, g, tools, config.prompt_length)
  run = EngineRun(model, tokens, mask, key, sampling, stop_tokens=stop_tokens, pad_id=pad_id,
                  engine=engine, mesh=mesh, stop_strings=stop_strings, tokenizer=chat.tokenizer,
                  hold=True, turn_tokens=config.turn_tokens)
  rows = [_Row(state) for state in states]
  stops = set(run.options.stop_tokens)
  metrics: collections.Counter = collections.Counter()
  waiting: dict[concurrent.futures.Future, list[tuple[int, np.ndarray, str]]] = {}
  with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="rljax-rollout") as worker:
    while not run.done:
      paused = run.advance()
      acting = []
      for r, completion, ended in zip(paused, run.completion(paused), run.ended(paused)):
        row = rows[r]
        row.turns += 1
        action = completion[row.start:]
        if ended == LENGTH and run.room(r) < 0:  # the row's budget is spent
          row.truncated = True
          run.finish(r)
        else:
          acting.append((r, action, ended))
      if acting:
        texts = [action_text(chat.tokenizer, a, stops) for _, a, _ in acting]
        future = worker.submit(safe_step, env, texts, [a.tolist() for _, a, _ in acting],
                               [rows[r].state for r, _, _ in acting],
                               timeout_s=config.env_timeout_s)
        waiting[future] = acting
      if waiting and not run.decoding:  # every live slot waits on the environment
        concurrent.futures.wait(waiting, return_when=concurrent.futures.FIRST_COMPLETED)
      for future in [f for f in waiting if f.done()]:
        _observe(run, chat, rows, waiting.pop(future), future.result(), max_turns, metrics)
      if not run.done and not run.decoding and not waiting:
        raise RuntimeError("the multi-turn rollout has paused rows but nothing to resume them.")

  out = run.rollout()
  n = out.completion_mask.shape[1]
  turn_rewards = np.zeros((len(rows), n), np.float32)
  turn_mask = np.zeros((len(rows), n), bool)
  for r, row in enumerate(rows):
    for index, reward in row.rewards:
      turn_rewards[r, index] += reward
      turn_mask[r, index] = True
  truncated = np.array([row.truncated for row in rows])
  policy = np.asarray(out.completion_mask) & ~run.observation_mask()
  if config.mask_truncated:
    policy &= ~truncated[:, None]
  return Trajectories(
    rollout=out, policy_mask=jnp.asarray(policy), turn_rewards=jnp.asarray(turn_rewards),
    turn_mask=jnp.asarray(turn_mask), rewards=jnp.asarray(turn_rewards.sum(axis=1)),
    num_turns=jnp.asarray([row.turns for row in rows], jnp.int32),
    truncated=jnp.asarray(truncated)), dict(metrics)


def action_text(tokenizer: Any, tokens: np.ndarray, stop_tokens: set[int]) -> str:
  """A turn's text as the environment reads it: its ids decoded with the special tokens kept
  (a tokenizer may mark tool-call tags such as <tool_call> special), except the stop ids at
  its end (the turn's terminator)."""
  ids = [int(t) for t in tokens]
  while ids and ids[-1] in stop_tokens:
    ids.pop()
  return tokenizer.decode(ids, skip_special_tokens=False)


def _observe(run: EngineRun, chat: ChatTurns, rows: list[_Row], acting, step, max_turns: int,
             metrics: collections.Counter) -> None:
  """The environment's answer to the turns `acting` [(row, action ids, how it ended)]: the
  rewards recorded at the turns' last tokens, each row ended or extended by its observation."""
  metrics.update(step.metrics)
  for (r, action, ended), observation, reward, done, state in zip(
      acting, step.observations, step.rewards, step.done, step.states):
    row = rows[r]
    row.rewards.append((row.start + len(action) - 1, float(reward)))
    row.state = state
    if done:
      run.finish(r)
      continue
    if row.turns >= max_turns:
      row.truncated = True
      run.finish(r)
      continue
    chunk = chat.close_turn(action.tolist(), ended) + chat.observation_tokens(observation)
    if len(chunk) > run.room(r):
      row.truncated = True
      run.finish(r)
      continue
    run.extend(r, chunk)
    row.start += len(action) + len(chunk)

