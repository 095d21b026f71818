"""Multi-task training parts: task samplers, loss weighting, adversarial sharing.

``MultiTaskTrainer`` drives them on Accelerate.
"""

from .adversarial import TaskDiscriminator, grad_reverse
from .sampler import TaskSampler
from .trainer import MultiTaskTrainer, TrainConfig, TrainingInterrupted
from .weighting import DWA, GradNorm, PCGrad, StaticWeighting, UncertaintyWeighting, make_weighting

__all__ = [
    "DWA",
    "GradNorm",
    "MultiTaskTrainer",
    "PCGrad",
    "StaticWeighting",
    "TaskDiscriminator",
    "TaskSampler",
    "TrainConfig",
    "TrainingInterrupted",
    "UncertaintyWeighting",
    "grad_reverse",
    "make_weighting",
]
