"""Multi-task training parts: task samplers, loss weighting, adversarial sharing.

The trainer that drives them on Accelerate arrives with the rest of issue 4.
"""

from .adversarial import TaskDiscriminator, grad_reverse
from .sampler import TaskSampler
from .weighting import DWA, GradNorm, PCGrad, StaticWeighting, UncertaintyWeighting, make_weighting

__all__ = [
    "DWA",
    "GradNorm",
    "PCGrad",
    "StaticWeighting",
    "TaskDiscriminator",
    "TaskSampler",
    "UncertaintyWeighting",
    "grad_reverse",
    "make_weighting",
]
