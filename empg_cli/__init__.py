"""empg: offline entropy analysis and entropy-modulated advantages (EMPG, AEM) for RL-trained LLM agents.

The library (docs/api.md): `import empg_cli as empg`, then empg.compute_advantages, empg.score, empg.read_rollouts,
empg.load_scored, empg.audit, empg.convert; every error a user can fix is an empg.EmpgError.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("empg")
except PackageNotFoundError:  # running from a source tree without an install
    __version__ = "0.0.0+source"

from .errors import BadInput, BadUsage, EmpgError, ModelLoadError  # noqa: E402
from .ingest import convert  # noqa: E402
from .library import audit, compute_advantages, load_scored, read_rollouts, score  # noqa: E402

__all__ = ["compute_advantages", "score", "read_rollouts", "load_scored", "audit", "convert", "EmpgError", "BadInput",
           "BadUsage", "ModelLoadError", "__version__"]
