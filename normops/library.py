"""The normops custom ops moved to ``normops.ops``, one module per norm family; this name stays for
code that imports the op objects from here."""
from .ops import in_torch, route, transformed, update_running_stats, update_running_stats_op
from .ops.batch_norm import batch_norm_backward_op, batch_norm_op
from .ops.group_norm import group_norm_backward_op, group_norm_op
from .ops.row_norm import row_norm_backward_op, row_norm_op

__all__ = ["batch_norm_backward_op", "batch_norm_op", "group_norm_backward_op", "group_norm_op", "in_torch",
           "route", "row_norm_backward_op", "row_norm_op", "transformed", "update_running_stats",
           "update_running_stats_op"]
