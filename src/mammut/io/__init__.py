"""mammut's own files: the checkpoint format and the helpers it shares with the application.

- :mod:`mammut.io.checkpoint`: ``save_pretrained`` / ``load_pretrained`` (``config.json`` +
  ``model.safetensors``) for every registered model; ``safetensors`` (the ``io`` extra) is
  imported only when a checkpoint is written or read.
- :mod:`mammut.io.atomic`: the one crash-safe writer (temporary file, fsync, rename, folder
  fsync) and ``sha256_file``; ``mammut.train`` writes its checkpoints and logs with it.
- :mod:`mammut.io.coerce`: plain data (JSON, YAML, command-line text) -> config dataclasses,
  with errors that name the dotted key; ``mammut.train.config`` checks run configs with it.

Converters for other projects' weights live in :mod:`mammut.convert`. Everything here imports
only the standard library and torch.
"""

from .checkpoint import CheckpointError, load_pretrained, read_checkpoint_config, save_pretrained

__all__ = ["CheckpointError", "save_pretrained", "load_pretrained", "read_checkpoint_config"]
