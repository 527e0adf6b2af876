"""Registry of the schedulers `render` and `sweep-rescale` can swap in.

Each entry builds a diffusers scheduler from the loaded pipeline's own scheduler
config, so the model's noise schedule (betas, prediction type, timestep spacing)
is kept and only the sampling method changes. `default` keeps the model's scheduler.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    UniPCMultistepScheduler,
)
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from renderqa.core.errors import InvalidInputError


@dataclass(frozen=True)
class SchedulerEntry:
    """How to build one scheduler, and its name in A1111's `Sampler` field."""

    scheduler_class: type[SchedulerMixin] | None
    a1111_sampler: str
    a1111_schedule: str = "Automatic"
    overrides: dict = field(default_factory=dict)


SCHEDULERS: dict[str, SchedulerEntry] = {
    "default": SchedulerEntry(None, "Default"),
    "euler": SchedulerEntry(EulerDiscreteScheduler, "Euler"),
    "euler-ancestral": SchedulerEntry(EulerAncestralDiscreteScheduler, "Euler a"),
    "dpm++-2m": SchedulerEntry(
        DPMSolverMultistepScheduler,
        "DPM++ 2M",
        overrides={
            "algorithm_type": "dpmsolver++",
            "solver_order": 2,
            "use_karras_sigmas": False,
        },
    ),
    "dpm++-2m-karras": SchedulerEntry(
        DPMSolverMultistepScheduler,
        "DPM++ 2M",
        "Karras",
        overrides={
            "algorithm_type": "dpmsolver++",
            "solver_order": 2,
            "use_karras_sigmas": True,
        },
    ),
    "ddim": SchedulerEntry(DDIMScheduler, "DDIM"),
    "unipc": SchedulerEntry(UniPCMultistepScheduler, "UniPC"),
}


def check_scheduler_name(name: str) -> SchedulerEntry:
    """Return the registry entry for `name`, or raise listing the known names."""
    if name not in SCHEDULERS:
        raise InvalidInputError(
            f"--scheduler {name!r} is unknown; use one of {', '.join(SCHEDULERS)}"
        )
    return SCHEDULERS[name]


def build_scheduler(name: str, current: SchedulerMixin) -> SchedulerMixin:
    """Build scheduler `name` from the config of the pipeline's `current` scheduler."""
    entry = check_scheduler_name(name)
    if entry.scheduler_class is None:
        return current
    return entry.scheduler_class.from_config(current.config, **entry.overrides)


def make_scheduler_factory(name: str) -> Callable[[SchedulerMixin], SchedulerMixin]:
    """Return a function that swaps scheduler `name` in for a given scheduler."""
    check_scheduler_name(name)
    return lambda current: build_scheduler(name, current)
