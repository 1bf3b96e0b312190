"""Classic-control study: a learned critic (PPO) vs group baselines on gymnasium environments.

The advantage estimators, policy loss, value loss and aggregation come from ``posttrain.algorithms``:
the same functions train LLMs and cart-poles.
"""

from posttrain.classic.config import RunResult, TrainConfig, make_config
from posttrain.classic.study import StudyResult, add_classic_arguments, main_from_args, run_study

__all__ = [
    "RunResult",
    "StudyResult",
    "TrainConfig",
    "add_classic_arguments",
    "main_from_args",
    "make_config",
    "run_study",
]
