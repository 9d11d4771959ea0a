"""rljax: reinforcement learning for large language models in JAX.

The functional core — every RL-for-LLM formula as a pure, jit-able function of arrays — is
importable from the top level: `from rljax import gae, grpo_loss, dpo_loss`.
"""

import logging as _logging

# transformers announces on import that PyTorch is absent (rljax uses only its tokenizers); drop
# that one record, leaving every other transformers warning.
_logging.getLogger("transformers").addFilter(
  lambda record: not record.getMessage().startswith("PyTorch was not found."))

from rljax import losses, ops  # noqa: E402
from rljax.losses import *  # noqa: E402, F403
from rljax.losses import __all__ as _losses_all  # noqa: E402
from rljax.ops import *  # noqa: E402, F403
from rljax.ops import __all__ as _ops_all  # noqa: E402

__version__ = "0.1.0"
__all__ = sorted(_ops_all + _losses_all)
