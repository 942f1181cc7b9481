"""Methods: one file each, each registering its config dataclass and adapter set by name.

Every module in this package is imported here, so a new method file registers itself.
"""

import importlib
import pkgutil

for _m in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_m.name}")
