"""Plan a run before renting the cluster: per-rank memory and FLOPs from shapes, nothing allocated.

`load_plan_config` reads the run config (weights absent is fine), `build_plan` builds the model on
the meta device and counts what every rank holds, `format_plan` prints it, `check_fits` raises a
one-line `PlanError` when a rank does not fit. `launcher/plan.py` is the command line.
"""

from megaflamingo.planning.inputs import load_plan_config, world_from_hostfile
from megaflamingo.planning.plan import GiB, Plan, PlanError, build_plan, check_fits
from megaflamingo.planning.report import format_plan, run_plan

__all__ = ["GiB", "Plan", "PlanError", "build_plan", "check_fits", "format_plan", "load_plan_config",
           "run_plan", "world_from_hostfile"]
