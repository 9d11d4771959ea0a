"""rljax: reinforcement learning for large language models in JAX.

The functional core — every RL-for-LLM formula as a pure, jit-able function of arrays — is
importable from the top level: `from rljax import gae, grpo_loss, dpo_loss`.
"""

from rljax import losses, ops
from rljax.losses import *  # noqa: F403
from rljax.losses import __all__ as _losses_all
from rljax.ops import *  # noqa: F403
from rljax.ops import __all__ as _ops_all

__version__ = "0.1.0"
__all__ = sorted(_ops_all + _losses_all)
