"""The model and what every method shares: configs, per-call routing state, task heads, AdapterModel."""
