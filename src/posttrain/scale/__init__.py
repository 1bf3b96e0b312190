"""Scaling out: Ray rollout workers and asynchronous rollouts (``ray.py``, ``asynchronous.py``), FSDP2
training (``fsdp.py``). Import the submodules directly: Ray and torch.distributed are optional."""
