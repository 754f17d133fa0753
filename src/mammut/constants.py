"""Constants that the library and the application share, defined once below both.

- :data:`IGNORE_INDEX`: a label with no target (``-100``, Hugging Face's and
  ``F.cross_entropy``'s default), ignored as pad by every captioning loss
  (:mod:`mammut.losses` re-exports it).
- :data:`MEDIA_TOKEN`: where an image sits in an interleaved text (``<image>``; its id is
  ``FlamingoPaLM``'s ``media_token_id``). The training tasks add it to a tokenizer they train,
  the run builder resolves its id into the model config (``mammut.train.build`` re-exports it),
  and evaluation finds it again in a run's tokenizer.

Imports nothing.
"""

from __future__ import annotations

__all__ = ["IGNORE_INDEX", "MEDIA_TOKEN"]

IGNORE_INDEX = -100  # a label with no target (Hugging Face's, F.cross_entropy's default): ignored as pad
MEDIA_TOKEN = "<image>"  # where an image sits in an interleaved text (FlamingoPaLM's media_token_id)
