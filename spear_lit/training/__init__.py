"""The learner: the LightningModule, its composable loss terms, and the mini-batch it consumes."""

from spear_lit.training.module import PolicyLearner
from spear_lit.training.sft import SFTLearner
from spear_lit.training.terms import EntropyTerm, KLTerm, PolicyTerm

__all__ = ["EntropyTerm", "KLTerm", "PolicyLearner", "PolicyTerm", "SFTLearner"]
