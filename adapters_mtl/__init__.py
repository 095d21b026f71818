"""adapters_mtl: many small adapters on one frozen transformer, routed per row, for multi-task learning.

Layout (dependencies point one way): ``apps`` → ``training``, ``serving`` → ``registry`` → ``files`` →
``model`` → ``methods`` → ``core`` (config, routing, heads). ``data`` holds packaged models and
corpora. See the README's "Layout" section.
"""

from . import _moved
from .core.config import HeadConfig
from .core.heads import HeadOutput
from .methods import (
    AdaLoraConfig,
    BottleneckConfig,
    IA3Config,
    LoraConfig,
    PrefixConfig,
    PromptConfig,
    register_method,
)
from .model import AdapterModel, AdapterOutput

__version__ = "0.1.0"

__all__ = [
    "AdaLoraConfig",
    "AdapterModel",
    "AdapterOutput",
    "BottleneckConfig",
    "HeadConfig",
    "HeadOutput",
    "IA3Config",
    "LoraConfig",
    "PrefixConfig",
    "PromptConfig",
    "__version__",
    "register_method",
]

_moved.install()
