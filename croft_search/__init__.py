"""croft-search: hyper-parameter and ablation search for robust fine-tuning of CLIP models."""

__version__ = "0.1.0"
