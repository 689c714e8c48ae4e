"""A WebShop-style shop (Yao et al. 2022): generated catalogue, BM25 search, WebShop's pages and score."""

from spear_lit.envs.webshop.catalogue import Goal, Product, generate_catalogue, make_goals
from spear_lit.envs.webshop.env import WebShopEnv
from spear_lit.envs.webshop.reward import get_reward
from spear_lit.envs.webshop.shop import Shop, ShopSession, get_shop, oracle_actions, parse_command

__all__ = [
    "Goal",
    "Product",
    "Shop",
    "ShopSession",
    "WebShopEnv",
    "generate_catalogue",
    "get_reward",
    "get_shop",
    "make_goals",
    "oracle_actions",
    "parse_command",
]
