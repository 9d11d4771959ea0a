"""The environment protocol of multi-turn rollouts: host-side, batched over rows, deterministic
given a seed.

A rollout of B rows alternates policy turns and environment steps:

  messages, states = env.reset(examples, seed=seed)      each row's initial chat and state
  repeat until every row is done (or out of turns / tokens):
    the policy decodes one turn per unfinished row       actions (text) and action_tokens (ids)
    step = safe_step(env, actions, action_tokens, states, timeout_s=...)   unfinished rows only
    each row that is not done gets step.observations[i] appended (mask 0 in the loss)

`Environment.step` may raise or hang; `safe_step` never does. An exception, a timeout or a
malformed `EnvStep` becomes, for the affected rows, an error observation (a message with
`error_role`, "user" by default, holding the error text), reward 0, done = `done_on_error`
(True by default: a failed environment's state cannot be trusted, so the row ends; its
observation is still returned, for logs), the row's input state, and a count in the metrics
("env_errors", "env_timeouts"). A `RowEnvironment` (per-row `reset_row` / `step_row`) fails
row by row: its rows run in a worker pool, each under its own time limit, and only the rows
that failed are replaced. Any other `Environment` fails as a whole: all of its rows.

Python cannot stop a thread: a row past its limit keeps its worker until `step_row` returns,
and its late result is dropped. `step_row` should return a new state rather than mutate its
input, which a timed-out row keeps.

Determinism: `RowEnvironment.reset` gives row i the generator `np.random.default_rng([seed, i])`;
an environment whose randomness comes only from it (kept in the row's state for later steps)
gives the same trajectories for the same seed, actions and tool results.
"""

from __future__ import annotations

import abc

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np

from rljax.agents._pool import Outcome, WorkerPool, check_timeout, run_limited

# Runs the batched `Environment.step` calls of `safe_step` (threads start when first needed; 4,
# so that a few steps that never return do not block the next ones).
_ENV_POOL = WorkerPool(4, "rljax-env")

# Roles an observation message may have: an observation is never the policy's own turn.
OBSERVATION_ROLES = ("user", "tool", "system")


def check_message(message: Any, name: str, roles: Sequence[str] | None = None) -> dict:
  """`message` as a dict with a string "role" (one of `roles` when given) and string "content";
  a ValueError names `name` otherwise."""
  if not isinstance(message, Mapping):
    raise ValueError(f"`{name}` must be a chat message dict; got {type(message).__name__}.")
  role, content = message.get("role"), message.get("content")
  if not isinstance(role, str) or (roles is not None and role not in roles):
    allowed = f" (one of {', '.join(map(repr, roles))})" if roles is not None else ""
    raise ValueError(f"`{name}` needs a string \"role\"{allowed}; got {role!r}.")
  if not isinstance(content, str):
    raise ValueError(f"`{name}` needs a string \"content\"; got {type(content).__name__}.")
  return dict(message)


@dataclass(frozen=True)
class Observation:
  """What is appended to a row's conversation after an environment step: exactly one kind.

  messages: chat messages (roles "user", "tool" or "system"), tokenised as the chat template's
            delta (`rljax.agents.observations.ChatTurns.observation_tokens`); () with
            tokens=None is the empty observation: the template's next assistant header only.
  tokens:   the token-level variant: exact ids appended as they are (messages must be empty).
  """
  messages: tuple[dict, ...] = ()
  tokens: tuple[int, ...] | None = None

  def __post_init__(self):
    if isinstance(self.messages, Mapping) or not isinstance(self.messages, Sequence):
      raise ValueError(f"`messages` must be a sequence of chat messages; got "
                       f"{type(self.messages).__name__}.")
    messages = tuple(check_message(m, f"messages[{i}]", OBSERVATION_ROLES)
                     for i, m in enumerate(self.messages))
    object.__setattr__(self, "messages", messages)
    if self.tokens is not None:
      tokens = tuple(self.tokens)
      if messages:
        raise ValueError("An Observation has either `messages` or `tokens`, not both; got "
                         f"{len(messages)} messages and {len(tokens)} tokens.")
      if not all(isinstance(t, (int, np.integer)) and not isinstance(t, bool) and t >= 0
                 for t in tokens):
        raise ValueError(f"`tokens` must be non-negative ints; got {tokens!r}.")
      object.__setattr__(self, "tokens", tuple(int(t) for t in tokens))


@dataclass
class EnvStep:
  """An environment step over R rows (the unfinished rows it was given, in their order).

  observations [R] Observation   appended to the rows that are not done
  rewards      [R] float32       this step's reward of each row (a per-turn reward)
  done         [R] bool          the row's trajectory ends here
  states       [R]               each row's next state
  metrics      {name: float}     sums over the rows (e.g. tool_calls, tool_errors, env_errors)
  """
  observations: list[Observation]
  rewards: np.ndarray
  done: np.ndarray
  states: list[Any]
  metrics: dict[str, float] = field(default_factory=dict)

  def __post_init__(self):
    self.observations = list(self.observations)
    self.states = list(self.states)
    for i, o in enumerate(self.observations):
      if not isinstance(o, Observation):
        raise ValueError(f"`observations[{i}]` must be an Observation; got {type(o).__name__}.")
    self.rewards = np.asarray(self.rewards, np.float32).reshape(-1)
    self.done = np.asarray(self.done).reshape(-1)
    if self.done.dtype != bool:
      raise ValueError(f"`done` must be booleans; got dtype {self.done.dtype}.")
    rows = len(self.observations)
    for name in ("rewards", "done", "states"):
      if len(getattr(self, name)) != rows:
        raise ValueError(f"`{name}` has {len(getattr(self, name))} rows but `observations` has "
                         f"{rows}; an EnvStep needs one entry per row.")
    self.metrics = {str(k): float(v) for k, v in dict(self.metrics).items()}


@runtime_checkable
class Environment(Protocol):
  """A batched environment (see the module docstring)."""

  def reset(self, examples: Sequence[Any], *, seed: int) -> tuple[list[list[dict]], list[Any]]:
    """Each row's initial chat messages and state, deterministic given `seed`."""
    ...

  def step(self, actions: Sequence[str], action_tokens: Sequence[Sequence[int]],
           states: Sequence[Any]) -> EnvStep:
    """One step of the unfinished rows: their turn's text and token ids, and their states."""
    ...


@dataclass
class RowStep:
  """One row's step (`RowEnvironment.step_row`): an `EnvStep` row, with its own metrics."""
  observation: Observation
  reward: float = 0.0
  done: bool = False
  state: Any = None
  metrics: dict[str, float] = field(default_factory=dict)


def check_seed(seed: Any) -> int:
  if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
    raise ValueError(f"`seed` must be an int >= 0; got {seed!r}.")
  return int(seed)


def _check_rows(actions, action_tokens, states) -> int:
  rows = len(states)
  for name, value in (("actions", actions), ("action_tokens", action_tokens)):
    if len(value) != rows:
      raise ValueError(f"`{name}` has {len(value)} rows but `states` has {rows}; a step needs "
                       "one action, one token list and one state per unfinished row.")
  return rows


class RowEnvironment(abc.ABC):
  """An environment defined row by row; the batched `Environment` protocol is derived.

  Subclasses implement `reset_row(example, rng) -> (messages, state)` and
  `step_row(action, action_tokens, state) -> RowStep`. `step` runs the rows in a pool of
  `max_workers` daemon threads (a class attribute) and raises the first row's exception;
  `safe_step` runs them with a per-row time limit and replaces only the failed rows.
  """

  max_workers: int = 8

  @abc.abstractmethod
  def reset_row(self, example: Any, rng: np.random.Generator) -> tuple[list[dict], Any]:
    """Row `example`'s initial chat messages and state, from the row's own generator."""

  @abc.abstractmethod
  def step_row(self, action: str, action_tokens: Sequence[int], state: Any) -> RowStep:
    """One row's step: its turn's text and ids, its state."""

  def reset(self, examples: Sequence[Any], *, seed: int) -> tuple[list[list[dict]], list[Any]]:
    """reset_row(examples[i], np.random.default_rng([seed, i])) for every row i."""
    seed = check_seed(seed)
    messages, states = [], []
    for i, example in enumerate(examples):
      row_messages, state = self.reset_row(example, np.random.default_rng([seed, i]))
      messages.append([check_message(m, f"reset_row(examples[{i}]) message {j}")
                       for j, m in enumerate(row_messages)])
      states.append(state)
    return messages, states

  def step(self, actions: Sequence[str], action_tokens: Sequence[Sequence[int]],
           states: Sequence[Any]) -> EnvStep:
    """step_row on every row, concurrently; the first failed row's exception is raised."""
    outcomes = self._run_rows(actions, action_tokens, states, None)
    for outcome in outcomes:
      if outcome.error is not None:
        raise outcome.error
    return _join_rows([o.value for o in outcomes], {})

  def _pool(self) -> WorkerPool:
    pool = self.__dict__.get("_rljax_pool")
    if pool is None:
      pool = self.__dict__["_rljax_pool"] = WorkerPool(self.max_workers, type(self).__name__)
    return pool

  def _run_rows(self, actions, action_tokens, states, timeout_s) -> list[Outcome]:
    _check_rows(actions, action_tokens, states)

    def row(i: int):
      def call() -> RowStep:
        result = self.step_row(actions[i], action_tokens[i], states[i])
        if not isinstance(result, RowStep):
          raise TypeError(f"step_row must return a RowStep; got {type(result).__name__}.")
        if not isinstance(result.observation, Observation):
          raise TypeError(f"step_row's RowStep.observation must be an Observation; got "
                          f"{type(result.observation).__name__}.")
        return result
      return call

    return run_limited(self._pool(), [row(i) for i in range(len(states))], timeout_s)


def _join_rows(rows: Sequence[RowStep], metrics: dict[str, float]) -> EnvStep:
  """The EnvStep of `rows`; `metrics` plus the sum of the rows' metrics."""
  total = dict(metrics)
  for r in rows:
    for k, v in r.metrics.items():
      total[k] = total.get(k, 0.0) + float(v)
  return EnvStep([r.observation for r in rows], np.array([r.reward for r in rows], np.float32),
                 np.array([bool(r.done) for r in rows], bool), [r.state for r in rows], total)


def error_observation(text: str, role: str = "user") -> Observation:
  """The observation standing for a failed step: one `role` message holding `text`."""
  return Observation(messages=({"role": role, "content": text},))


def _error_text(outcome: Outcome, timeout_s: float | None) -> str:
  if outcome.timed_out:
    return f"Environment error: the step did not finish within {timeout_s:g} s."
  e = outcome.error
  return f"Environment error: {type(e).__name__}: {e}"


def safe_step(env: Environment, actions: Sequence[str], action_tokens: Sequence[Sequence[int]],
              states: Sequence[Any], *, timeout_s: float | None, done_on_error: bool = True,
              error_role: str = "user") -> EnvStep:
  """env.step(actions, action_tokens, states), with every exception, timeout (`timeout_s`
  seconds; None: no limit) or malformed result turned into error rows (see the module
  docstring). Metrics add "env_errors" and "env_timeouts": the number of failed rows (0 when
  none failed, so the keys are always there)."""
  timeout_s = check_timeout(timeout_s)
  if error_role not in OBSERVATION_ROLES:
    raise ValueError(f"`error_role` must be one of {OBSERVATION_ROLES}; got {error_role!r}.")
  rows = _check_rows(actions, action_tokens, states)

  def failed(outcome: Outcome, state: Any) -> RowStep:
    return RowStep(error_observation(_error_text(outcome, timeout_s), error_role), 0.0,
                   done_on_error, state)

  if isinstance(env, RowEnvironment):
    outcomes = env._run_rows(actions, action_tokens, states, timeout_s)
    steps = [o.value if o.ok else failed(o, s) for o, s in zip(outcomes, states)]
    counts = {"env_errors": sum(o.error is not None for o in outcomes),
              "env_timeouts": sum(o.timed_out for o in outcomes)}
    return _join_rows(steps, counts)

  def whole() -> EnvStep:
    step = env.step(actions, action_tokens, states)
    if not isinstance(step, EnvStep):
      raise TypeError(f"step must return an EnvStep; got {type(step).__name__}.")
    if len(step.observations) != rows:
      raise ValueError(f"step returned {len(step.observations)} rows for {rows} given.")
    return step

  (outcome,) = run_limited(_ENV_POOL, [whole], timeout_s)
  if outcome.ok:
    step = outcome.value
    step.metrics = {"env_errors": 0.0, "env_timeouts": 0.0, **step.metrics}
    return step
  counts = {"env_errors": rows * (outcome.error is not None),
            "env_timeouts": rows * outcome.timed_out}
  return _join_rows([failed(outcome, s) for s in states], counts)


