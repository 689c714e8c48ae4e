"""The shop (catalogue + BM25 search) and one shopper's session: WebShop's text-mode pages and actions.

:class:`ShopSession` has the method shape of WebShop's own text environment
(``web_agent_site/envs/web_agent_text_env.py``: ``step(action) -> (observation, reward, done, info)``
and ``get_available_actions() -> {"has_search_bar", "clickables"}``), with the same action grammar
(``search[query]``, ``click[text]``, clickables lower-cased) and ``[SEP]``-joined page text, so
:class:`~spear_lit.envs.webshop.env.WebShopEnv` would adapt a session of the real server unchanged.

Pages: ``search`` (only ``search[...]``) → ``results`` (10 per page, at most 50 results; ``back to
search``, ``< prev``, ``next >``, product ids) → ``item`` (option values, ``description``,
``features``, ``< prev``, ``buy now``) → ``description`` / ``features`` (``< prev``) ; ``buy now``
→ ``done`` with the score of :func:`~spear_lit.envs.webshop.reward.get_reward`.
"""

from __future__ import annotations

import dataclasses
import functools
import re

import numpy as np
from rank_bm25 import BM25Okapi

from spear_lit.envs.webshop.catalogue import Goal, Product, generate_catalogue, make_goals, tokenize
from spear_lit.envs.webshop.reward import get_reward

SEP = " [SEP] "
PAGE_SIZE = 10
MAX_RESULTS = 50  # WebShop's search returns the top 50
MAX_QUERY_TOKENS = 64  # bounds the cost of a search whatever the policy writes
_ACTION = re.compile(r"\s*(search|click)\s*\[(.*)\]\s*", re.DOTALL | re.IGNORECASE)


def parse_command(action: str) -> tuple[str, str] | None:
    """``"click[Buy Now]"`` → ``("click", "buy now")``; ``None`` if it is not ``search[…]``/``click[…]``.

    Click arguments are lower-cased and whitespace-collapsed (WebShop's clickables are lower case);
    search queries keep their text, stripped.
    """
    m = _ACTION.fullmatch(action or "")
    if m is None:
        return None
    name, arg = m.group(1).lower(), " ".join(m.group(2).split())
    return (name, arg.lower() if name == "click" else arg)


class Shop:
    """A generated catalogue, its goals and a BM25 index (read-only; shared by all sessions).

    Args:
        num_products: catalogue size.
        seed: seeds the catalogue and the goals.
        asin_prefix: replaces the ``B0`` that starts every ASIN (same catalogue otherwise). ``""`` gives
            8-character ids that differ from their first character on, which a tiny byte-level policy
            copies from the page far more easily than ten ids that all begin with ``b0``.
    """

    def __init__(self, *, num_products: int = 300, seed: int = 0, asin_prefix: str = "B0"):
        if not re.fullmatch(r"[A-Z0-9]*", asin_prefix):
            raise ValueError(f"asin_prefix={asin_prefix!r}: upper-case letters and digits only")
        self.products = [
            dataclasses.replace(p, asin=asin_prefix + p.asin[2:])
            for p in generate_catalogue(num_products, seed)
        ]
        self.by_asin = {p.asin.lower(): p for p in self.products}
        self.goals: list[Goal] = make_goals(self.products, seed)
        # Indexed text: title, type, attributes, bullet points and description (not options or price).
        docs = [
            tokenize(" ".join([p.title, p.query, *p.attributes, *p.bullet_points, p.description]))
            for p in self.products
        ]
        self._bm25 = BM25Okapi(docs)
        self._cache: dict[str, tuple[str, ...]] = {}

    def product(self, asin: str) -> Product:
        """The product with this ASIN (any case)."""
        return self.by_asin[asin.lower()]

    def search(self, query: str) -> tuple[str, ...]:
        """ASINs of the (at most 50) products with a positive BM25 score, best first, ties by catalogue order."""
        key = " ".join(tokenize(query)[:MAX_QUERY_TOKENS])
        hits = self._cache.get(key)
        if hits is None:
            scores = self._bm25.get_scores(key.split()) if key else np.zeros(len(self.products))
            order = np.argsort(-scores, kind="stable")[:MAX_RESULTS]
            hits = self._cache[key] = tuple(self.products[i].asin for i in order if scores[i] > 0)
            if len(self._cache) > 4096:  # a bounded memo: the n envs of a group repeat their queries
                self._cache.clear()
        return hits


@functools.lru_cache(maxsize=8)
def get_shop(num_products: int = 300, seed: int = 0, asin_prefix: str = "B0") -> Shop:
    """One shared :class:`Shop` per argument set: environments of a run share index and goals."""
    return Shop(num_products=num_products, seed=seed, asin_prefix=asin_prefix)


class ShopSession:
    """One shopper's browser on a :class:`Shop`, working towards ``goal``."""

    def __init__(self, shop: Shop, goal: Goal):
        self.shop, self.goal = shop, goal
        self.page = "search"  # search | results | item | description | features | done
        self.results: tuple[str, ...] = ()
        self.page_num = 1
        self.asin: str | None = None
        self.options: dict[str, str] = {}  # selected option values of the open item, group → value
        self.score_info: dict = {}

    # -- what the shopper sees --------------------------------------------------------------------
    def _item_clickables(self) -> list[str]:
        values = [v for _, vs in self.shop.product(self.asin).options for v in vs]
        return ["back to search", "< prev", *values, "description", "features", "buy now"]

    def clickables(self) -> list[str]:
        """The lower-cased texts ``click[...]`` accepts on the current page."""
        if self.page == "results":
            first = (self.page_num - 1) * PAGE_SIZE
            nav = ["< prev"] if self.page_num > 1 else []
            nav += ["next >"] if first + PAGE_SIZE < len(self.results) else []
            return ["back to search", *nav, *(a.lower() for a in self.results[first : first + PAGE_SIZE])]
        if self.page == "item":
            return self._item_clickables()
        if self.page in ("description", "features"):
            return ["back to search", "< prev"]
        return []

    def get_available_actions(self) -> dict:
        """WebShop's ``{"has_search_bar": bool, "clickables": [...]}``."""
        return {"has_search_bar": self.page == "search", "clickables": self.clickables()}

    @property
    def observation(self) -> str:
        """The current page in WebShop's simple text mode (visible texts joined by ``[SEP]``)."""
        head = ["Instruction:", self.goal.instruction, "Back to Search"]
        if self.page == "search":
            return SEP.join(["WebShop", "Instruction:", self.goal.instruction, "Search"])
        if self.page == "results":
            first = (self.page_num - 1) * PAGE_SIZE
            parts = [*head, f"Page {self.page_num} (Total results: {len(self.results)})"]
            parts += ["< Prev"] if self.page_num > 1 else []
            parts += ["Next >"] if first + PAGE_SIZE < len(self.results) else []
            for asin in self.results[first : first + PAGE_SIZE]:
                p = self.shop.product(asin)
                parts += [p.asin, p.title, f"${p.price:.2f}"]
            return SEP.join(parts)
        if self.page == "done":
            return SEP.join(["Thank you for shopping with us!", *self._purchase_summary()])
        p = self.shop.product(self.asin)
        if self.page == "description":
            return SEP.join([*head, "< Prev", p.description])
        if self.page == "features":
            return SEP.join([*head, "< Prev", *p.bullet_points])
        parts = [*head, "< Prev"]
        for group, values in p.options:
            parts += [group, *values]
        if self.options:
            parts.append("Selected: " + ", ".join(f"{k}: {v}" for k, v in self.options.items()))
        parts += [p.title, f"Price: ${p.price:.2f}", "Rating: N.A.", "Description", "Features", "Buy Now"]
        return SEP.join(parts)

    def _purchase_summary(self) -> list[str]:
        p = self.shop.product(self.asin)
        chosen = ", ".join(f"{k}: {v}" for k, v in self.options.items()) or "none"
        score = self.score_info["score"]
        return [
            "Purchased",
            p.asin,
            p.title,
            f"Options: {chosen}",
            "Your score (min 0.0, max 1.0)",
            f"{score:.2f}",
        ]

    # -- what the shopper does --------------------------------------------------------------------
    def _click(self, arg: str) -> None:
        if arg == "back to search":
            self.page, self.results, self.asin, self.options = "search", (), None, {}
        elif arg == "next >":
            self.page_num += 1
        elif arg == "< prev":
            if self.page == "results":
                self.page_num -= 1
            else:  # item page → its results page; description/features → the item page
                self.page = "results" if self.page == "item" else "item"
        elif self.page == "results":  # a product id
            self.page, self.asin, self.options = "item", arg, {}
        elif arg in ("description", "features"):
            self.page = arg
        elif arg == "buy now":
            p = self.shop.product(self.asin)
            _, info = get_reward(p, self.goal, p.price, self.options)
            self.score_info = {**info, "asin": p.asin, "options": dict(self.options)}
            self.page = "done"
        else:  # an option value (values are unique within a product)
            group = next(g for g, vs in self.shop.product(self.asin).options if arg in vs)
            self.options[group] = arg

    def step(self, action: str) -> tuple[str, float, bool, dict]:
        """Apply one action: ``(observation, score, done, info)``; ``score`` is non-zero only at ``buy now``.

        An action that is not admissible on this page changes nothing and has ``info["valid"] = False``.
        """
        parsed = parse_command(action)
        valid = parsed is not None and self.page != "done"
        if valid:
            name, arg = parsed
            if name == "search":
                valid = self.page == "search" and bool(tokenize(arg))
                if valid:
                    self.page, self.results, self.page_num = "results", self.shop.search(arg), 1
            else:
                valid = arg in self.clickables()
                if valid:
                    self._click(arg)
        done = self.page == "done"
        score = self.score_info["score"] if done and valid else 0.0
        return (
            self.observation,
            score,
            done,
            {"valid": valid, "page": self.page, **(self.score_info if done else {})},
        )


def oracle_actions(goal: Goal, shop: Shop) -> list[str]:
    """An expert's actions for ``goal`` (cold-start SFT demonstrations): search the goal's type and
    attributes, open the first result that scores 1.0 (paging to it), pick the goal's options, buy.

    The expert reads the catalogue directly to judge results (it stands in for a careful human
    demonstrator); if no result scores 1.0 it buys the best-scoring one.
    """
    query = " ".join([goal.query, *goal.attributes])
    wanted = dict(goal.options)
    best = (-1.0, 0, None, {})
    for rank, asin in enumerate(shop.search(query)):
        p = shop.product(asin)
        options = {g: wanted[g] if wanted.get(g) in vs else vs[0] for g, vs in p.options}
        score, _ = get_reward(p, goal, p.price, options)
        if score > best[0]:
            best = (score, rank, asin, options)
        if score >= 1.0:
            break
    _, rank, asin, options = best
    actions = [f"search[{query}]"]
    if asin is not None:
        actions += ["click[next >]"] * (rank // PAGE_SIZE) + [f"click[{asin.lower()}]"]
        actions += [f"click[{v}]" for v in options.values()] + ["click[buy now]"]
    return actions
