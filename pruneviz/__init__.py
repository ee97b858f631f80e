"""pruneviz: see and do structured pruning of causal language models.

Public API (library first; the app and the CLI only call these):

- loading: :func:`pruneviz.loading.load_model`
- units: :func:`pruneviz.arch.geometry_of`, :func:`pruneviz.arch.adapter_for`
- plans: :class:`pruneviz.plan.Plan`
- surgery: :func:`pruneviz.surgery.apply_plan`, :func:`pruneviz.surgery.masked_model`
"""
__version__ = "0.1.0"
