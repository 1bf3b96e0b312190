"""posttrain: reinforcement-learning post-training of language models on one shared core."""

__version__ = "0.1.0"
