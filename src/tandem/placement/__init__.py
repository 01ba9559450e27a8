"""Placement: rules (regex on tensor names -> device + kernel) and the memory planner."""

from tandem.placement.planner import MemoryPlan, check_fits, plan_memory
from tandem.placement.rules import Placement, PlacementError, Rule, assign, default_rules, load_rules

__all__ = ["MemoryPlan", "Placement", "PlacementError", "Rule", "assign", "check_fits",
           "default_rules", "load_rules", "plan_memory"]
