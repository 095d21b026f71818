"""Multi-task training: ``MultiTaskTrainer`` drives its parts on Accelerate.

config (TrainConfig), batches (what each step trains on: sampler + per-task example streams, sliced per
process), weighting (how task losses combine, torchjd's aggregators among them), soft_sharing (the pull
towards the tasks' mean adapter), early_stopping, checkpoint (the format on disk), folding
(shared stacks into one adapter per task), adversarial (task discriminator), objectives (per task kind:
loss and metrics), run_state (metrics.csv, Ctrl-C), accelerator.
"""

from .adversarial import TaskDiscriminator, grad_reverse
from .sampler import TaskSampler
from .trainer import MultiTaskTrainer, TrainConfig, TrainingInterrupted
from .weighting import (
    DWA,
    GradNorm,
    JacobianAggregation,
    LossWeighting,
    PCGrad,
    StaticWeighting,
    UncertaintyWeighting,
    make_weighting,
)

__all__ = [
    "DWA",
    "GradNorm",
    "JacobianAggregation",
    "LossWeighting",
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
