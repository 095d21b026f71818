"""What the model and every method share: configs, per-call routing state, task heads, PEFT module paths."""
