"""fastdistill: dataset condensation and knowledge distillation with pre-trained vision foundation models."""

__version__ = "0.1.0"
