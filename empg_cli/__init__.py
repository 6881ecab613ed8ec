"""empg: offline entropy analysis and entropy-modulated advantages (EMPG, AEM) for RL-trained LLM agents."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("empg")
except PackageNotFoundError:  # running from a source tree without an install
    __version__ = "0.0.0+source"
