"""Built-in importance criteria; importing this package registers them (see :mod:`pruneviz.importance`)."""
import importlib
import pkgutil

for _mod in pkgutil.iter_modules(__path__):
    if not _mod.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_mod.name}")
