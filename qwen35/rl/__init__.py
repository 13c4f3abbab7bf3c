"""Asynchronous RL for qwen35 models on Ray: rollouts on the engine, training on qwen35.train's optimiser.

    from qwen35.rl import RLConfig, run_rl
    result = run_rl(RLConfig(model="embedded", updates=20, out_dir="runs/rl"))

Modules: ``losses`` (GRPO advantages, clipped IS-corrected policy gradient), ``rollout`` (engine rollouts with
logprobs, versions, routing record/replay), ``trainer`` (the policy update), ``rewards`` (tasks and reward
functions), ``tools`` (the tool environment of multi-turn tool tasks: calculator, lookup), ``loop`` (the Ray
driver and actors), ``plots``.  Ray is needed only by ``loop``
(``pip install 'qwen35[rl]'``).
"""

from qwen35.rl.config import RL_TASKS, RLConfig

__all__ = ["RLConfig", "RL_TASKS", "run_rl", "RLResult"]


def __getattr__(name: str):
    if name in ("run_rl", "RLResult", "RLRun"):
        from qwen35.rl import loop

        return getattr(loop, name)
    raise AttributeError(name)
