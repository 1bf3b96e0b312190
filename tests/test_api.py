"""The Python API exactly as the README shows it: ``from posttrain import TrainConfig, train``."""

import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.slow


def test_readme_python_api_trains_in_a_fresh_interpreter(tmp_path):
    script = textwrap.dedent(
        f"""
        from posttrain import TrainConfig, train
        result = train(TrainConfig(
            algorithm="dapo",
            run={{"output_dir": {str(tmp_path)!r}}},
            model={{"tiny_hidden_size": 32, "tiny_layers": 1}},
            warmstart={{"steps": 5, "batch_size": 8}},
            data={{"num_train": 16, "num_test": 4}},
            rollout={{"prompts_per_step": 2, "group_size": 2}},
            optim={{"steps": 1}},
            eval={{"num_prompts": 4, "every": 0}},
            logging={{"tensorboard": False, "progress": False}},
        ))
        print(result.table, result.plot_path)
        """
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "after RL" in done.stdout and "curves.png" in done.stdout


def test_train_stays_callable_whatever_was_imported_first():
    import posttrain.train.loop  # noqa: F401  (binds the subpackage to posttrain.train)
    from posttrain import train

    assert callable(train) and train is sys.modules["posttrain.train"]
    with pytest.raises(TypeError):
        train()  # a config is required
