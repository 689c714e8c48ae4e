"""Rollouts: engines that generate, agent loops that interleave generation with tools, trajectories."""

from spear_lit.rollout.hf_engine import Continuation, HFEngine, RolloutEngine
from spear_lit.rollout.vllm_engine import VLLMEngine  # imports vLLM only in VLLMEngine.bind

__all__ = ["Continuation", "HFEngine", "RolloutEngine", "VLLMEngine"]
