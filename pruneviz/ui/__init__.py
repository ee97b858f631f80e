"""The Streamlit app's support code (``app.py`` and ``pages/`` only compose widgets and call these).

- :mod:`.state`: the process-wide store (shared base models, caches) and per-session state.
- :mod:`.work`: long work with progress, cancel and errors shown as messages.
- :mod:`.services`: the app's actions (compute importance, apply a plan, evaluate, sweep) as jobs.
- :mod:`.analysis`: pure computations behind the views (masks, binning, comparison, costs, selections).
- :mod:`.figures`: pure Plotly figure builders.
- :mod:`.components`: small Streamlit components shared by the pages (the frame, the model picker, metrics).
"""
