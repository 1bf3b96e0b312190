"""posttrain: reinforcement-learning post-training of language models on one shared core.

from posttrain import train, TrainConfig
result = train(TrainConfig(algorithm="grpo"))
"""

from typing import Any

__version__ = "0.1.0"
__all__ = ["TrainConfig", "load_config", "train"]


def __getattr__(name: str) -> Any:
    # keep `import posttrain` light: the trainer pulls in transformers
    if name in ("train",):
        import posttrain.train  # a callable package: train(config) runs posttrain.train.loop.train

        return posttrain.train
    if name in ("TrainConfig", "load_config"):
        from posttrain.train import config

        return getattr(config, name)
    raise AttributeError(name)
