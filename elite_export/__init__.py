"""elite-export: ELITE (Wei et al., ICCV 2023) exported to ONNX / TensorRT and served lean.

Importing this package must stay cheap and torch-free: the runtime (elite_export.runtime) lives
under it and serves hosts that have no torch installed.
"""
from elite_export.errors import EliteError

__version__ = "0.1.0"
__all__ = ["EliteError", "__version__"]
