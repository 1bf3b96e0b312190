import shutil
from pathlib import Path

import pytest
import yaml

from posttrain.train.config import load_config

CONFIGS = sorted((Path(__file__).parents[1] / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_validate(path, request, tmp_path, monkeypatch):
    distill = yaml.safe_load(path.read_text()).get("distill") or {}
    if distill.get("teachers"):  # the experts a demo trains first (benchmarks/distill_demo.py): stand-ins
        model = request.getfixturevalue("tiny_model_dir")
        monkeypatch.chdir(tmp_path)
        for teacher in distill["teachers"]:
            shutil.copytree(model, tmp_path / teacher["path"])
    config = load_config(path)
    assert config.preset().name == config.algorithm


def test_there_are_shipped_configs():
    assert len(CONFIGS) >= 2
