"""Math problems from local files in their published column layouts (parquet or jsonl).

Layouts (required columns):
  * ``aime2024`` (Maxwell-Jia/AIME_2024): ``Problem``, ``Answer``
  * ``aime2025`` (yentinglin/aime_2025): ``problem``, ``answer``
  * ``dapo`` (DAPO-Math-17k): ``prompt`` (chat list of ``{role, content}``; the user content is the
    problem), ``reward_model`` (``{"ground_truth": ...}``)

No data is downloaded: the user points ``train_files``/``val_files`` at files they have.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from pathlib import Path

from spear_lit.tasks.base import Problem
from spear_lit.tasks.prompts import RETOOL_ANSWER_FORMAT, resolve_system_prompt
from spear_lit.tasks.scoring import Scorer, check_scorer, strict_box

SUFFIX_PRESETS: dict[str, str] = {"retool": RETOOL_ANSWER_FORMAT}

LAYOUTS: dict[str, tuple[str, str]] = {
    "aime2024": ("Problem", "Answer"),
    "aime2025": ("problem", "answer"),
    "dapo": ("prompt", "reward_model"),
}


def answer_str(value) -> str:
    """Ground truth as text: ints (and integral floats) without ``.0``, strings stripped."""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value).strip()


def resolve_prompt_suffix(suffix: str | None) -> str:
    """A preset name (``"retool"``) gives the preset text; ``None`` gives ``""``; other text is verbatim."""
    return "" if suffix is None else SUFFIX_PRESETS.get(suffix, suffix)


def read_rows(path: str | Path) -> tuple[list[dict], list[str], list[str]]:
    """Rows of a ``.parquet`` or ``.jsonl`` file, its column names (jsonl: keys of all rows) and where each
    row is, for messages: ``x.jsonl:7`` (the 1-based line; blank lines are skipped) or ``x.parquet: row 7``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"math data file not found: {path}")
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        table = pq.read_table(path)
        return (
            table.to_pylist(),
            list(table.column_names),
            [f"{path}: row {i}" for i in range(1, table.num_rows + 1)],
        )
    if path.suffix == ".jsonl":
        rows, places = [], []
        with path.open("rb") as f:
            for number, raw in enumerate(f, 1):
                if not raw.strip():
                    continue
                try:
                    row = json.loads(raw.decode("utf-8").rstrip())
                except UnicodeDecodeError as e:
                    raise ValueError(f"{path}:{number}: not UTF-8 text (byte {e.start + 1})") from None
                except json.JSONDecodeError as e:
                    raise ValueError(
                        f"{path}:{number}: not valid JSON ({e.msg}, column {e.colno}); "
                        "each line of a .jsonl file is one JSON object"
                    ) from None
                if not isinstance(row, dict):
                    raise ValueError(
                        f"{path}:{number}: a row must be a JSON object, not {type(row).__name__}"
                    )
                rows.append(row)
                places.append(f"{path}:{number}")
        columns = list(dict.fromkeys(key for row in rows for key in row))
        return rows, columns, places
    raise ValueError(f"{path}: unsupported file type {path.suffix!r}; use .parquet or .jsonl")


def detect_layout(columns: Sequence[str], path: str | Path = "") -> str:
    """The first layout of ``LAYOUTS`` whose required columns are all present."""
    for layout, required in LAYOUTS.items():
        if set(required) <= set(columns):
            return layout
    wanted = "; ".join(f"{k}: {', '.join(v)}" for k, v in LAYOUTS.items())
    raise ValueError(f"{path}: no known layout matches columns {list(columns)} (layouts: {wanted})")


def _dapo_row(row: dict, where: str) -> tuple[str, str]:
    messages, reward_model = row["prompt"], row["reward_model"]
    user = [m.get("content") for m in messages or [] if isinstance(m, dict) and m.get("role") == "user"]
    if not user or not isinstance(user[-1], str):
        raise ValueError(f"{where}: 'prompt' has no user message with text content")
    if not isinstance(reward_model, dict) or reward_model.get("ground_truth") is None:
        raise ValueError(f"{where}: 'reward_model' has no 'ground_truth'")
    return user[-1], answer_str(reward_model["ground_truth"])


def load_math_file(path: str | Path, layout: str = "auto") -> list[Problem]:
    """Problems of one file, in file order.

    Args:
        path: ``.parquet`` or ``.jsonl`` file.
        layout: a key of ``LAYOUTS``, or ``"auto"`` to detect it from the columns.

    Returns:
        ``Problem(uid="<stem>-<row>", prompt=<problem text>, answer=<str>, meta={"source", "index"})``.
    """
    rows, columns, places = read_rows(path)
    if layout == "auto":
        layout = detect_layout(columns, path)
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; allowed: {sorted(LAYOUTS)} or 'auto'")
    stem = Path(path).stem
    problems = []
    for i, row in enumerate(rows):
        for column in LAYOUTS[layout]:
            if column not in row:
                raise ValueError(
                    f"{places[i]}: lacks required column {column!r} of layout {layout!r}; "
                    f"columns found: {list(row) if row else columns}"
                )
        if layout == "dapo":
            prompt, answer = _dapo_row(row, places[i])
        else:
            question_col, answer_col = LAYOUTS[layout]
            prompt, answer = str(row[question_col]), answer_str(row[answer_col])
        problems.append(Problem(f"{stem}-{i}", prompt, answer, {"source": stem, "index": i}))
    return problems


def load_aime2024(path: str | Path) -> list[Problem]:
    """AIME 2024 layout (``Problem``/``Answer``)."""
    return load_math_file(path, "aime2024")


def load_aime2025(path: str | Path) -> list[Problem]:
    """AIME 2025 layout (``problem``/``answer``)."""
    return load_math_file(path, "aime2025")


def load_dapo_math(path: str | Path) -> list[Problem]:
    """DAPO-Math-17k layout (``prompt`` chat list / ``reward_model.ground_truth``)."""
    return load_math_file(path, "dapo")


class FileMathTask:
    """Math problems from local files (e.g. DAPO-Math-17k to train, AIME 2024/2025 to validate).

    Args:
        train_files: files to draw training problems from (may be empty for a validation-only task); a
            single path is taken as a one-element list (also for ``val_files``).
        val_files: files of the fixed validation set (concatenated in order).
        name: metric name (``val/<name>/accuracy``).
        layout: layout of every file, or ``"auto"`` (per file, from its columns).
        scorer: ``(response, ground_truth) -> (reward, prediction)``: :func:`~spear_lit.tasks.scoring.strict_box`
            (SPEAR_SPEC §6.1) or :func:`~spear_lit.tasks.scoring.math_verify_score`.
        system_prompt: a preset name (default ``"retool"``), literal text, or ``None``.
        prompt_suffix: appended to every problem text: a preset name (default ``"retool"``: the verl ReTool
            recipe's answer format), literal text, or ``None``. System prompt and suffix are the format the
            cold-start checkpoint was fine-tuned on (the shipped tiny policy: ``None`` and ``None``).
        max_problems: keep only the first ``max_problems`` of the training and of the validation list.
    """

    def __init__(
        self,
        *,
        train_files: Sequence[str] = (),
        val_files: Sequence[str] = (),
        name: str = "math",
        layout: str = "auto",
        scorer: Scorer = strict_box,
        system_prompt: str | None = "retool",
        prompt_suffix: str | None = "retool",
        max_problems: int | None = None,
    ):
        self.name, self._scorer = name, check_scorer(scorer)
        self.system_prompt = resolve_system_prompt(system_prompt)
        suffix = resolve_prompt_suffix(prompt_suffix)
        self._train = self._load(train_files, layout, suffix, max_problems)
        self._val = self._load(val_files, layout, suffix, max_problems)

    @staticmethod
    def _load(files, layout, suffix, limit) -> list[Problem]:
        files = [files] if isinstance(files, (str, Path)) else files  # one path: a one-element list
        problems = [p for f in files for p in load_math_file(f, layout)]
        problems = [Problem(p.uid, p.prompt + suffix, p.answer, p.meta) for p in problems]
        return problems if limit is None else problems[:limit]

    def train_problems(self, n: int, rng: random.Random) -> list[Problem]:
        """``n`` problems: without replacement while ``n`` fits, then further shuffled passes."""
        if not self._train:
            raise ValueError(f"task {self.name!r} has no training problems (train_files is empty)")
        out: list[Problem] = []
        while len(out) < n:
            out += rng.sample(self._train, min(n - len(out), len(self._train)))
        return out

    def val_problems(self) -> list[Problem]:
        """The validation problems in file order."""
        return list(self._val)

    def score(self, response: str, problem: Problem) -> tuple[float, str | None]:
        """``(+1 | -1, prediction)`` with the configured scorer."""
        return self._scorer(response, problem.answer)
