"""The adapter registry: a store (the files) and a catalog (their index), joined by AdapterRegistry.

See :mod:`adapters_mtl.registry.store` for the layout on disk and :mod:`adapters_mtl.registry.catalog` for
the index.
"""

from .adapter_registry import AdapterRecord, AdapterRegistry, RegistryError, default_root
from .catalog import Catalog
from .store import Store, StoreError

__all__ = [
    "AdapterRecord",
    "AdapterRegistry",
    "Catalog",
    "RegistryError",
    "Store",
    "StoreError",
    "default_root",
]
