"""The memory planner: compile the trainer's step ahead of time on abstract arrays for a mesh, and say per device
what the parameters, optimizer state, gradients and activations take, whether it fits, and if not, what would.

    from jaxft.plan import plan_config, parse_bytes
    report = plan_config("configs/llama3.1-8b-lora-8gpu.yaml", devices=8, device_memory=parse_bytes("80GiB"))

`python -m jaxft.plan CONFIG [overrides] [--devices N --device-memory 80GiB] [--json]` is the command.
"""

from jaxft.plan.abstract import AbstractRun, abstract_run, shard_bytes
from jaxft.plan.memory import Estimate, MemoryPlan, compile_step, parse_bytes, plan_memory, rule_of_thumb
from jaxft.plan.planner import Report, check_fits, format_report, plan_config, refuse_unless_fits
from jaxft.plan.recommend import Recommendation, recommend

__all__ = ["AbstractRun", "Estimate", "MemoryPlan", "Recommendation", "Report", "abstract_run", "check_fits",
           "compile_step", "format_report", "parse_bytes", "plan_config", "plan_memory", "recommend",
           "refuse_unless_fits", "rule_of_thumb", "shard_bytes"]
