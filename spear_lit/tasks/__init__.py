"""Tasks: problems, prompts, scorers and expert traces (math with a Python tool; file-based math)."""

from spear_lit.tasks.base import Problem, Task, prompt_messages
from spear_lit.tasks.math_files import (
    FileMathTask,
    load_aime2024,
    load_aime2025,
    load_dapo_math,
    load_math_file,
)
from spear_lit.tasks.math_tool import ArithmeticToolTask
from spear_lit.tasks.scoring import Scorer, check_scorer, math_verify_score, strict_box
from spear_lit.tasks.toolcall import TOOL_NAME, format_tool_call, has_final_answer, parse_tool_calls

__all__ = [
    "TOOL_NAME",
    "ArithmeticToolTask",
    "FileMathTask",
    "Problem",
    "Scorer",
    "Task",
    "check_scorer",
    "format_tool_call",
    "has_final_answer",
    "load_aime2024",
    "load_aime2025",
    "load_dapo_math",
    "load_math_file",
    "math_verify_score",
    "parse_tool_calls",
    "prompt_messages",
    "strict_box",
]
