"""What the compiled HLO text of a program says about its compile cost; imports nothing but `re`,
so both rljax's benchmarks and the Tunix worker (`tunix_worker.py`, its own venv) use it.

XLA:CPU generates code for every fusion whose computation differs (structurally identical
fusions share one kernel), and its compile time grows with the number of those kernels (~30 ms
each on the 2-core VM, `jax.profiler` trace of the compile: `FusionCompiler::Compile` events)
far more than with their size. `distinct_kernels` counts them from `compiled.as_text()`.
"""

from __future__ import annotations

import re

_COMPUTATION = re.compile(r"^(%[\w.\-]+) (\([^\n]*\)) -> [^\n]* \{\n(.*?)\n\}", re.M | re.S)
_FUSION = re.compile(r"fusion\([^)]*\), kind=(k\w+), calls=(%[\w.\-]+)")


def distinct_kernels(hlo: str) -> tuple[int, int]:
  """(distinct fusion computations XLA generates code for, their instructions in all) of the
  optimised HLO text `hlo`. Custom fusions (`kCustom`: oneDNN / XNNPACK / YNNPACK library
  calls) are left out: no code is generated for them. Two fusions are the same kernel when their
  computations are equal up to instruction names and metadata."""
  computations = {name: (signature, body) for name, signature, body in _COMPUTATION.findall(hlo)}
  seen: set[str] = set()
  instructions = 0
  for kind, called in _FUSION.findall(hlo):
    if kind == "kCustom" or called not in computations:
      continue
    signature, body = computations[called]
    body = re.sub(r", metadata=\{[^}]*\}", "", body)
    key = re.sub(r"[\w.\-]+:", "", signature) + re.sub(r"%[\w.\-]+", "%x", body)
    if key not in seen:
      seen.add(key)
      instructions += body.count("\n") + 1
  return len(seen), instructions
