"""Using adapters at inference: the adapter cache (registry loads under a budget), the Composer pipeline
(predict/generate/merge on top of it), merging, LoraHub composition."""
