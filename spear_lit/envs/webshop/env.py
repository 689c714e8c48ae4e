"""``WebShopEnv``: the generated shop behind the :class:`~spear_lit.envs.base.TextEnv` interface."""

from __future__ import annotations

from spear_lit.envs.base import StepResult
from spear_lit.envs.webshop.shop import ShopSession, get_shop, oracle_actions

SPLITS = ("train", "val")


class WebShopEnv:
    """A WebShop-style shopping episode (SPEAR_SPEC §6.2, §9, §12): find and buy what the instruction asks.

    ``reset(task_id)`` opens goal ``task_id`` of the split on the search page; the episode ends at
    ``buy now`` (reward = WebShop score × ``reward_scale``, ``won`` iff the score is 1.0) or after
    ``max_steps`` actions, valid or not (reward 0, ``info["truncated"] = True``). The goals are
    WebShop-style synthetic goals over the generated catalogue, shuffled with ``seed``; the first
    ``val_goals`` are the validation split, the rest training; ``task_id`` wraps around its split.

    Args:
        num_products: catalogue size (products are spread evenly over 10 product types).
        seed: seeds catalogue and goals; environments with equal ``(num_products, seed)`` share them.
        max_steps: actions per episode (15 in the paper's WebShop runs).
        reward_scale: multiplies the [0, 1] score at ``buy now`` (10 in the agent experiments).
        split: ``"train"`` or ``"val"``.
        val_goals: number of goals held out for validation.
        asin_prefix: the start of every product id (``B0`` as on Amazon; see :class:`Shop`).
    """

    def __init__(
        self,
        *,
        num_products: int = 300,
        seed: int = 0,
        max_steps: int = 15,
        reward_scale: float = 10.0,
        split: str = "train",
        val_goals: int = 500,
        asin_prefix: str = "B0",
    ):
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        self.shop = get_shop(num_products, seed, asin_prefix)
        if not 0 < val_goals < len(self.shop.goals):
            raise ValueError(f"val_goals must be in (0, {len(self.shop.goals)}), got {val_goals}")
        self.goals = self.shop.goals[:val_goals] if split == "val" else self.shop.goals[val_goals:]
        self.max_steps, self.reward_scale = max_steps, reward_scale
        self.session: ShopSession | None = None
        self.task_id, self.steps = None, 0

    @property
    def num_tasks(self) -> int:
        """Distinct goals in this split (larger task ids wrap around)."""
        return len(self.goals)

    def _admissible(self) -> list[str]:
        available = self.session.get_available_actions()
        search = ["search[<query>]"] if available["has_search_bar"] else []
        return search + [f"click[{c}]" for c in available["clickables"]]

    def reset(self, task_id: int) -> StepResult:
        """Open goal ``task_id`` on the search page; the observation holds the instruction."""
        self.task_id, self.steps = task_id, 0
        self.session = ShopSession(self.shop, self.goals[task_id % len(self.goals)])
        info = {"task_id": task_id, "page": "search", "goal_asin": self.session.goal.asin}
        return StepResult(self.session.observation, admissible_actions=self._admissible(), info=info)

    def step(self, action: str) -> StepResult:
        """Apply one action; after the episode ended, any action is invalid and changes nothing."""
        if self.session is None:
            raise RuntimeError("call reset(task_id) before step()")
        if self.session.page == "done" or self.steps >= self.max_steps:
            return StepResult(
                self.session.observation, done=True, valid=False, info={"task_id": self.task_id}
            )
        observation, score, done, info = self.session.step(action)
        self.steps += 1
        valid = info.pop("valid")
        info.update(task_id=self.task_id, step=self.steps)
        reward, won = (score * self.reward_scale, score >= 1.0 - 1e-9) if done else (0.0, False)
        if not done and self.steps >= self.max_steps:
            done, info["truncated"] = True, True
        admissible = [] if done else self._admissible()
        return StepResult(observation, reward, done, won, valid, admissible, info)

    def oracle_actions(self) -> list[str]:
        """The expert's actions for the current goal (see :func:`~spear_lit.envs.webshop.shop.oracle_actions`)."""
        if self.session is None:
            raise RuntimeError("call reset(task_id) before oracle_actions()")
        return oracle_actions(self.session.goal, self.shop)

    def close(self) -> None:
        """Nothing to release (pure Python); drops the session."""
        self.session = None
