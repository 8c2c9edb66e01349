"""ISQ: quantize a model tensor by tensor by a policy (llama.cpp's mixes, rules, imatrix)."""

from jaxquant.isq.mixes import PRESETS
from jaxquant.isq.policy import Choice, Layers, Plan, Policy, PolicyWarning, Rule, load_policy, preset

__all__ = ["Policy", "Rule", "Layers", "Plan", "Choice", "PolicyWarning", "preset", "load_policy", "PRESETS"]
