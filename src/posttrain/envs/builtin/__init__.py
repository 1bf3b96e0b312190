"""Built-in text environments, registered by name for configs."""

from posttrain.envs.builtin.key_chain import (
    DEFAULT_OPTIONS,
    KeyChainEnv,
    demonstrate,
    play_demonstrator,
    sample_row,
    transcript_corpus,
)

__all__ = [
    "DEFAULT_OPTIONS",
    "ENVS",
    "KeyChainEnv",
    "demonstrate",
    "play_demonstrator",
    "sample_row",
    "transcript_corpus",
]

ENVS: dict[str, type] = {"key_chain": KeyChainEnv}
