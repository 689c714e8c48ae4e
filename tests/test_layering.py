"""The layering of DESIGN.md as a test: who may import whom, read from the source (AST), so an import inside a
function (a lazy import is still a dependency) counts like one at the top of a file.

Rules (a file matching ``where`` may not import a module in ``forbidden``, a module or any of its submodules):

* ``spear_lit/algos``: pure functions: no other project module (``spear_lit.*`` outside algos, ``callbacks``,
  ``datamodules``), no Lightning, Hydra/OmegaConf or ``torch.distributed``;
* ``spear_lit/training``: no rollout engine, agent, task, environment or tool, no vLLM, no data module;
* ``spear_lit/{tasks,envs,tools}``: no Lightning, no ``spear_lit.training``, callbacks or data modules;
* everything but ``train.py``, ``bench/`` and ``tests/``: no Hydra or OmegaConf (configuration stops at the edge);
* ``callbacks/``: no data-module internals (``datamodules.<anything>``).

Plus the run-time view: ``import spear_lit.training`` loads no rollout engine, agent, task, environment or tool.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from dataclasses import dataclass
from fnmatch import fnmatch
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SKIP_DIRS = {".venv", ".git", "outputs", "multirun", "runs", "build", "node_modules", "__pycache__"}
ROLLOUT_SIDE = (
    "spear_lit.rollout",
    "spear_lit.agents",
    "spear_lit.tasks",
    "spear_lit.envs",
    "spear_lit.tools",
    "vllm",
)
LIGHTNING = ("lightning", "pytorch_lightning")
HYDRA = ("hydra", "omegaconf")


@dataclass(frozen=True)
class Rule:
    name: str
    where: tuple[str, ...]  # file patterns (fnmatch, relative to the repository root)
    forbidden: tuple[str, ...]  # module prefixes
    allowed: tuple[str, ...] = ()  # exceptions to ``forbidden`` (module prefixes)
    exempt: tuple[str, ...] = ()  # file patterns the rule does not apply to


RULES = [
    Rule(
        "algos are pure: no other project module, Lightning, Hydra/OmegaConf or torch.distributed",
        ("spear_lit/algos/*",),
        ("spear_lit", "callbacks", "datamodules", "train", *LIGHTNING, *HYDRA, "torch.distributed"),
        allowed=("spear_lit.algos",),
    ),
    Rule(
        "training never imports the rollout side (engines, agents, tasks, envs, tools, vLLM) or data modules",
        ("spear_lit/training/*",),
        (*ROLLOUT_SIDE, "datamodules"),
    ),
    Rule(
        "tasks, envs and tools import neither Lightning nor the learner, callbacks or data modules",
        ("spear_lit/tasks/*", "spear_lit/envs/*", "spear_lit/tools/*"),
        (*LIGHTNING, "spear_lit.training", "callbacks", "datamodules"),
    ),
    Rule(
        "only the composition roots (train.py; spear_lit/plan.py, which composes train.py's config to simulate"
        " it), bench/ and tests/ import Hydra or OmegaConf",
        ("*",),
        HYDRA,
        exempt=("train.py", "spear_lit/plan.py", "bench/*", "tests/*"),
    ),
    Rule("callbacks do not import data-module internals", ("callbacks/*",), ("datamodules.",)),
]


def imported_modules(path: Path, package: str) -> list[tuple[int, str]]:
    """``(line, module)`` of every import in the file, at any depth (``from a import b`` gives ``a`` and
    ``a.b``: ``b`` may be a submodule); relative imports resolved against ``package``."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(p for p in (*parts, base) if p)
            out.append((node.lineno, base))
            out += [(node.lineno, f"{base}.{a.name}") for a in node.names if a.name != "*"]
        elif (
            isinstance(node, ast.Call)
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
            and (
                getattr(node.func, "attr", None) == "import_module"
                or getattr(node.func, "id", None) in ("__import__", "import_module")
            )
        ):
            out.append((node.lineno, node.args[0].value))
    return out


def _matches(module: str, prefixes: tuple[str, ...]) -> bool:
    return any(
        module.startswith(p) if p.endswith(".") else module == p or module.startswith(p + ".")
        for p in prefixes
    )


def python_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*.py") if not SKIP_DIRS & set(p.relative_to(root).parts[:-1]))


def violations(root: Path, rules: list[Rule] = RULES) -> list[str]:
    """``file:line: imports <module>: <rule>`` for every import a rule forbids."""
    out = []
    for path in python_files(root):
        rel = path.relative_to(root).as_posix()
        applicable = [
            r
            for r in rules
            if any(fnmatch(rel, w) for w in r.where) and not any(fnmatch(rel, e) for e in r.exempt)
        ]
        if not applicable:
            continue
        package = ".".join(rel.split("/")[:-1])  # of a module or an __init__.py alike
        seen = set()
        for line, module in imported_modules(path, package):  # `from a import b`: a first, then a.b
            for r in applicable:
                if (
                    (line, r.name) not in seen
                    and _matches(module, r.forbidden)
                    and not _matches(module, r.allowed)
                ):
                    seen.add((line, r.name))
                    out.append(f"{rel}:{line}: imports {module}: {r.name}")
    return sorted(out)


def test_the_tree_keeps_its_layers():
    found = violations(REPO)
    assert not found, "layering violations:\n  " + "\n  ".join(found)


def test_importing_the_learner_loads_nothing_of_the_rollout_side():
    code = (
        "import sys, spear_lit.training\n"
        f"print([m for m in sys.modules if any(m == p or m.startswith(p + '.') for p in {ROLLOUT_SIDE!r})])"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", f"import spear_lit.training loaded: {out.stdout.strip()}"


def test_the_checker_names_file_line_and_rule(tmp_path):
    algos = tmp_path / "spear_lit" / "algos"
    algos.mkdir(parents=True)
    (algos / "__init__.py").write_text("from .good import f\n")
    (algos / "good.py").write_text(
        "import math\n\nimport torch\n\nfrom . import other\n\n\ndef f():\n    return 1\n"
    )
    (algos / "bad.py").write_text(
        "import torch\n\n\ndef f():\n    from torch import distributed\n"
        "    from ..training import module\n    return distributed, module\n"
    )
    (tmp_path / "callbacks").mkdir()
    (tmp_path / "callbacks" / "x.py").write_text("import datamodules\nfrom datamodules.rollout import R\n")
    (tmp_path / "spear_lit" / "tools").mkdir()
    (tmp_path / "spear_lit" / "tools" / "t.py").write_text(
        "import importlib\nimportlib.import_module('omegaconf')\n"
    )
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "test_x.py").write_text("import hydra\n")  # tests may compose configs
    found = violations(tmp_path)
    assert found == [
        f"callbacks/x.py:2: imports datamodules.rollout: {RULES[4].name}",
        f"spear_lit/algos/bad.py:5: imports torch.distributed: {RULES[0].name}",
        f"spear_lit/algos/bad.py:6: imports spear_lit.training: {RULES[0].name}",
        f"spear_lit/tools/t.py:2: imports omegaconf: {RULES[3].name}",
    ], found
