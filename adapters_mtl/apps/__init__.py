"""Entry points: the ``adapters-mtl`` CLI, YAML recipes (checked before any model loads), the demo."""
