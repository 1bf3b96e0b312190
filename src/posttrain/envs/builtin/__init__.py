"""Built-in text environments, registered by name for configs."""

from posttrain.envs.builtin.key_chain import (
    DEFAULT_OPTIONS,
    KeyChainEnv,
    demonstrate,
    play_demonstrator,
    sample_row,
    transcript_corpus,
)
from posttrain.envs.builtin.leaky_chain import LeakyChainEnv, leaky_transcript_corpus

__all__ = [
    "DEFAULT_OPTIONS",
    "ENVS",
    "KeyChainEnv",
    "LeakyChainEnv",
    "demonstrate",
    "leaky_transcript_corpus",
    "play_demonstrator",
    "sample_row",
    "transcript_corpus",
]

ENVS: dict[str, type] = {"key_chain": KeyChainEnv, "leaky_chain": LeakyChainEnv}
