"""Side-by-side: posttrain's classic PPO vs Stable-Baselines3 PPO on CartPole-v1, matched settings.

Both use 4 envs x 128 steps, 4 epochs of 4 minibatches (128 samples), Adam lr 2.5e-4 (eps 1e-5)
linearly annealed, gamma 0.99, GAE lambda 0.95, clip 0.2, value clip 0.2, entropy 0.01, value
coefficient 0.5, max grad norm 0.5, advantage normalisation, separate 64x64 tanh actor and critic
with orthogonal init, one torch thread. Prints steps/s of each, the ratio and final returns (mean of
the last 20 training episodes).

    python benchmarks/classic_vs_sb3.py --steps 100000 --seeds 1

CleanRL's ppo.py is not included: the ``cleanrl`` package on PyPI (0.4.8) installs beside torch
2.13.0 but ships a 2021 ppo.py written for the old ``gym`` API (``gym.wrappers.Monitor``,
``distutils``), which no longer runs with the gym 0.26 it resolves to.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from posttrain.classic.config import make_config
from posttrain.classic.ppo import train_ppo

ENV_ID = "CartPole-v1"


def run_posttrain(steps: int, seed: int) -> tuple[float, float]:
    """(steps/s, final return) of posttrain's PPO."""
    result = train_ppo(make_config(ENV_ID, "ppo", total_steps=steps, seed=seed))
    return result.steps_per_sec, result.final_return


def run_sb3(steps: int, seed: int) -> tuple[float, float]:
    """(steps/s, final return) of Stable-Baselines3's PPO with the matched settings."""
    from stable_baselines3 import PPO
    from stable_baselines3.common.env_util import make_vec_env

    env = make_vec_env(ENV_ID, n_envs=4, seed=seed)
    model = PPO(
        "MlpPolicy",
        env,
        n_steps=128,
        batch_size=128,
        n_epochs=4,
        learning_rate=lambda progress_remaining: 2.5e-4 * progress_remaining,
        gamma=0.99,
        gae_lambda=0.95,
        clip_range=0.2,
        clip_range_vf=0.2,
        ent_coef=0.01,
        vf_coef=0.5,
        max_grad_norm=0.5,
        policy_kwargs={"net_arch": {"pi": [64, 64], "vf": [64, 64]}, "activation_fn": torch.nn.Tanh},
        seed=seed,
        device="cpu",
        verbose=0,
    )
    start = time.perf_counter()
    model.learn(total_timesteps=steps)
    wall = time.perf_counter() - start
    returns = [info["r"] for info in list(model.ep_info_buffer)[-20:]]
    return model.num_timesteps / wall, statistics.fmean(returns) if returns else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=100_000)
    parser.add_argument("--seeds", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = []
    for name, runner in (("posttrain", run_posttrain), ("stable-baselines3", run_sb3)):
        runs = [runner(args.steps, seed) for seed in range(args.seeds)]
        sps = statistics.fmean(r[0] for r in runs)
        finals = [r[1] for r in runs]
        rows.append((name, sps, finals))
        print(f"{name:>18}: {sps:8.0f} steps/s   final returns {[round(f, 1) for f in finals]}", flush=True)
    ours, theirs = rows[0][1], rows[1][1]
    print(f"steps/s ratio posttrain / stable-baselines3: {ours / theirs:.2f}x")


if __name__ == "__main__":
    main()
