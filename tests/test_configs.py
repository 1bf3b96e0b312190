from pathlib import Path

import pytest

from posttrain.train.config import load_config

CONFIGS = sorted((Path(__file__).parents[1] / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_validate(path):
    config = load_config(path)
    assert config.preset().name == config.algorithm


def test_there_are_shipped_configs():
    assert len(CONFIGS) >= 2
