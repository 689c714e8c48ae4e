"""Agents: how training rows of one RL iteration are rolled out (the :class:`~spear_lit.rollout.protocol.Agent`
protocol). ``ToolAgent``: math with a code interpreter, one row per episode; ``EnvAgent``: step-wise
environment agents (ALFWorld, WebShop), one row per step. Chosen by the ``agent`` config group."""

from spear_lit.agents.env_agent import EnvAgent
from spear_lit.agents.math import ToolAgent

__all__ = ["EnvAgent", "ToolAgent"]
