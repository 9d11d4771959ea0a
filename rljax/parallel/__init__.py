"""Device meshes and logical-axis sharding rules (see `rljax.parallel.rules`)."""

from rljax.parallel.rules import (
  DATA_PARALLEL_RULES,
  FSDP_RULES,
  FSDP_TP_RULES,
  MESH_AXES,
  RULE_SETS,
  get_rules,
  logical_axis_rules,
  logical_partition_specs,
  logical_to_mesh_spec,
  mesh_and_rules,
  named_shardings,
  place_by_logical_axes,
  shard_state,
)

__all__ = [
  "DATA_PARALLEL_RULES",
  "FSDP_RULES",
  "FSDP_TP_RULES",
  "MESH_AXES",
  "RULE_SETS",
  "get_rules",
  "logical_axis_rules",
  "logical_partition_specs",
  "logical_to_mesh_spec",
  "mesh_and_rules",
  "named_shardings",
  "place_by_logical_axes",
  "shard_state",
]
