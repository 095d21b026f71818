"""Using adapters at inference: the Composer (cache + predict/generate), merging, LoraHub composition."""
