"""adapters_mtl: many small adapters on one frozen transformer, routed per row, for multi-task learning."""

from .config import HeadConfig, LoraConfig, PrefixConfig
from .heads import HeadOutput
from .methods import register_method
from .model import AdapterModel, AdapterOutput

__version__ = "0.1.0"

__all__ = [
    "AdapterModel",
    "AdapterOutput",
    "HeadConfig",
    "HeadOutput",
    "LoraConfig",
    "PrefixConfig",
    "__version__",
    "register_method",
]
