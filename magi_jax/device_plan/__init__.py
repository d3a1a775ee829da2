"""What fits on this machine: the runtime (detect.py), the memory plan for sampling on one
device (plan.py, sizes from estimate.py), and the compiler's figure for it (compiler.py).

    from magi_jax.device_plan import choose, detect
    plan = choose("4.5B_distill", detect())
    print(plan.describe())         # before anything loads
    plan.require().apply(config)   # PlanError when it does not fit
"""

from magi_jax.device_plan.detect import Runtime, detect, runtime_of
from magi_jax.device_plan.plan import MemoryPlan, PlanError, choose

__all__ = ["MemoryPlan", "PlanError", "Runtime", "choose", "detect", "runtime_of"]
