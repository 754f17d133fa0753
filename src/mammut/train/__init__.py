"""Training stack: config, loop, distributed wrapping, checkpoints (``mammut train``)."""

from .build import build_model
from .config import ConfigError, RunConfig, load_config
from .loop import NonFiniteLossError, Trainer, TrainResult

__all__ = [
    "ConfigError",
    "RunConfig",
    "load_config",
    "Trainer",
    "TrainResult",
    "NonFiniteLossError",
    "build_model",
]
