"""The scheduling core: which stream each operator runs on, in which order operators launch, and which
cross-stream waits are needed -- on a plain DAG, with no torch involved (see docs/scheduler.md).

    from opara_nb.schedule import DAG, make_plan
    dag = DAG(nodes=["a", "b", "c"], edges=[("a", "b"), ("a", "c")])
    plan = make_plan(dag, strategy="opara")     # plan.streams, plan.order, plan.syncs, plan.num_streams
"""
from __future__ import annotations

from .dag import DAG
from .order import ORDERS, launch_order
from .physical import StreamMapping, map_physical_streams
from .merge import fused_times, makespan, merge_cheap_streams
from .plan import Plan, make_plan, plan_on_streams
from .segments import Segment, SegmentIO, partition, segment_io, segment_plan
from .simulate import critical_path, simulate
from .streams import STRATEGIES, allocate_streams, levels

__all__ = ["DAG", "Plan", "STRATEGIES", "ORDERS", "allocate_streams", "launch_order", "make_plan", "levels",
           "plan_on_streams", "StreamMapping", "map_physical_streams", "critical_path", "simulate",
           "merge_cheap_streams", "fused_times", "makespan", "Segment", "SegmentIO", "partition", "segment_plan",
           "segment_io"]
