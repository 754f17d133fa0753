"""Text generation for every decoder that follows the decoder protocol (MaMMUT, CoCa,
FlamingoPaLM): greedy search, beam search and sampling, with a KV cache.

    from mammut.generation import generate, caption, GenerationConfig, GenerationOutput
    ids = generate(model, images, max_new_tokens=16)                      # keywords, or
    ids = generate(model, images, config=GenerationConfig(strategy="beam", num_beams=4))

Legend: ``b`` batch (images), ``k`` beams, ``r`` active rows (``b`` or ``b * k``, fewer once
rows finish), ``p`` prompt columns (left-padded), ``n`` new tokens, ``v`` vocabulary.

The decoder protocol (``mammut.generation.protocol.Decoder``, a runtime-checkable Protocol that
``generate`` checks with ``isinstance``; reference implementation: ``MaMMUT.image_context`` /
``MaMMUT.decode``):
``model.image_context(images=... | image_tokens=...)`` encodes the images once;
``model.decode(text, context, keep=, positions=, cache=)`` returns logits for the new tokens
``text`` given a ``KVCache`` holding what came before; ``model.config`` has ``pad_id``,
``bos_id``, ``eos_id`` and ``num_tokens``. mammut's models (``decode`` =
``to_logits(decode_hidden(...))``) get only the last position through the vocabulary
projection. Optional (``PositionBounded``): ``model.decode_positions()``, the number of
positions the decoder can embed (``generate`` checks against it, so that the model's steps need
not read positions back).

How it runs (files: ``protocol.py`` the decoder protocol, ``config.py`` options, ``inputs.py``
prompts and contexts, ``batch.py`` the rows (``DecodeRows``) and the done-row policy,
``loop.py`` greedy / sampling and logits processing, ``beam.py`` beam search, ``compiled.py``
torch.compile and CUDA graphs, ``api.py`` the entry points):

- arguments, prompts and images are checked once, before any compute; the per-token step
  holds no argument check and no host read (the loop reads one number per step, how many rows
  are still going, and only when there is an eos);
- the image is encoded once; beams and row drops only ``index_select`` the context; the
  cache's cross-attention keys/values are projected once, on the first step, and in beam
  search kept as one copy per image that all its beams read (see ``CrossAttention``);
- prompts of different lengths are left-padded so every row ends in the same column;
  ``keep`` (real-token mask over the whole sequence so far) and ``positions`` (count of real
  tokens before each token) make every row decode exactly as it would alone;
- with the cache (default) the prompt is decoded once, then one token per step; in beam search
  the prompt is decoded once per image, not once per beam;
- rows (greedy, sampling) or images (beam search) that are done are dropped from the active
  batch, and the loop stops as soon as all are done. Output rows are right-padded with
  ``pad_id`` after their ``eos_id``.

Static cache and compiled steps (``static_cache=True``, ``compile=True``): the cache is a
``StaticKVCache`` of ``capacity`` columns (prompt + new tokens, rounded up to a multiple of
``STATIC_ROUND`` so captions of similar lengths share one compiled step) and every step after
the prompt has the same shapes: one token per row, keys over all ``capacity`` columns (those
not written yet masked out), and done rows stay in the batch (their outputs are discarded)
instead of being dropped. ``compile=True`` runs that step through ``torch.compile``
(``dynamic=False``): traced on the first call for a given model, batch and capacity, then
reused for every token (torch keeps at most ``torch._dynamo.config.recompile_limit``, by
default 8, such graphs per model, then runs the step eagerly with a warning). On CUDA the
step is also captured as a CUDA graph and replayed (``cuda_graph``, see ``compiled.py``).
Logits equal the dynamic cache's up to float rounding, hence the same tokens and scores unless
two candidates tie within that rounding (greedy and beam search); sampling draws random
numbers for done rows too, so once a row is done the other rows' samples differ from the
dynamic path's (still exact samples of the same distributions).
"""

from .api import caption, generate
from .config import STATIC_ROUND, STRATEGIES, GenerationConfig, GenerationOutput
from .inputs import select_context

__all__ = ["GenerationConfig", "GenerationOutput", "generate", "caption", "select_context", "STRATEGIES", "STATIC_ROUND"]
