"""Multi-task training: ``MultiTaskTrainer`` drives its parts on Accelerate.

config (TrainConfig), batches (what each step trains on: sampler + per-task example streams, sliced per
process), weighting (how task losses combine, torchjd's aggregators among them), soft_sharing (the pull
towards the tasks' mean adapter), early_stopping, checkpoint (the format on disk), folding
(shared stacks into one adapter per task), adversarial (task discriminator), objectives (per task kind:
loss and metrics), run_state (metrics.csv, Ctrl-C), accelerator (FSDP2 for the frozen base); hf_trainer (the same routed
training under ``transformers.Trainer``).
"""

from .adversarial import TaskDiscriminator, grad_reverse
from .hf_trainer import RoutedCollator, RoutedTrainer, routed_dataset, routed_loss
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
    "RoutedCollator",
    "RoutedTrainer",
    "StaticWeighting",
    "TaskDiscriminator",
    "TaskSampler",
    "TrainConfig",
    "TrainingInterrupted",
    "UncertaintyWeighting",
    "grad_reverse",
    "make_weighting",
    "routed_dataset",
    "routed_loss",
]
