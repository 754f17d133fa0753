"""mammut's own files, below every other package: the checkpoint format and the helpers the
library and the application share. A leaf: the standard library and torch (extras lazily),
nothing of mammut but :mod:`mammut._version`; a contract in ``pyproject.toml``
(``[tool.importlinter]``, checked by ``tests/test_layering.py``) keeps it so.

- :mod:`mammut.io.checkpoint`: the checkpoint format (``config.json`` + ``model.safetensors``):
  its names, errors, ``read_checkpoint_config`` and the weights file's checks. Saving and
  loading a model (``save_pretrained`` / ``load_pretrained``, which need the model registry)
  is :mod:`mammut.models.pretrained`; ``safetensors`` (the ``io`` extra) is imported only when
  a checkpoint is written or read.
- :mod:`mammut.io.atomic`: the one crash-safe writer (temporary file, fsync, rename, folder
  fsync) and ``sha256_file``; ``mammut.train`` writes its checkpoints and logs with it.
- :mod:`mammut.io.coerce`: plain data (JSON, YAML, command-line text) -> config dataclasses,
  with errors that name the dotted key; ``mammut.train.config`` checks run configs with it.
- :mod:`mammut.io.runlock`: one writer per folder (a run, an index).

Converters for other projects' weights live in :mod:`mammut.convert`.
"""

from .checkpoint import CheckpointError, read_checkpoint_config

__all__ = ["CheckpointError", "read_checkpoint_config"]
