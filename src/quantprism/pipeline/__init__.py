"""The data flow: plan (targets → recipes → one canonical pass) → build (export, per-target validation in its
own runtime process, gates) → report. ``quantprism.pipeline`` re-exports the plan's entry points."""
from .plan import CanonicalRun, measure_sensitivity, plan_recipes, run_stage, target_plan, targets_of

__all__ = ["CanonicalRun", "measure_sensitivity", "plan_recipes", "run_stage", "target_plan", "targets_of"]
