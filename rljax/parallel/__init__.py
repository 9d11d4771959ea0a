"""Device meshes, logical-axis sharding rules and multi-host start-up.

See `rljax.parallel.mesh` (MeshConfig, make_mesh, use_mesh, constrain), `rljax.parallel.rules`
(logical axis names and rule sets), `rljax.parallel.context` (context parallelism: attention of
rows split along T) and `rljax.parallel.distributed` (initialize).
"""

from rljax.parallel.context import context_parallel, context_shards, sequence_axes
from rljax.parallel.distributed import initialize, is_initialized, launcher_detected, shutdown
from rljax.parallel.mesh import MeshConfig, constrain, make_mesh, use_mesh

from rljax.parallel.rules import (
  DATA_PARALLEL_RULES,
  FSDP_RULES,
  FSDP_TP_RULES,
  MESH_AXES,
  RULE_SETS,
  get_rules,
  inference_rules,
  logical_axis_rules,
  logical_partition_specs,
  logical_to_mesh_spec,
  mesh_and_rules,
  named_shardings,
  place_by_logical_axes,
  shard_state,
)

__all__ = [
  "MeshConfig",
  "constrain",
  "context_parallel",
  "context_shards",
  "initialize",
  "is_initialized",
  "launcher_detected",
  "make_mesh",
  "shutdown",
  "use_mesh",
  "DATA_PARALLEL_RULES",
  "FSDP_RULES",
  "FSDP_TP_RULES",
  "MESH_AXES",
  "RULE_SETS",
  "get_rules",
  "inference_rules",
  "logical_axis_rules",
  "logical_partition_specs",
  "logical_to_mesh_spec",
  "mesh_and_rules",
  "named_shardings",
  "place_by_logical_axes",
  "sequence_axes",
  "shard_state",
]
