"""Streamlit names whose home moved between releases (imported from here by the rest of ``pruneviz.ui``)."""
try:  # Streamlit's control-flow exceptions (BaseException subclasses): rerun and stop requests
    from streamlit.runtime.scriptrunner_utils.exceptions import ScriptControlException, StopException
except ImportError:  # pragma: no cover - older/newer layouts
    from streamlit.runtime.scriptrunner import RerunException as ScriptControlException  # type: ignore
    from streamlit.runtime.scriptrunner import StopException  # type: ignore

__all__ = ["ScriptControlException", "StopException"]
