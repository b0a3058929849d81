"""normkd: knowledge distillation with NORM (N-to-One Representation Matching) and strong baselines."""

__version__ = "0.1.0"
