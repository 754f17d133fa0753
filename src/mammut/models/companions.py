"""What a checkpoint needs besides the model to run on images and strings: its image
preprocessing and its tokenizer, written beside ``config.json`` by ``save_pretrained(...,
preprocess=, tokenizer=)`` and read back by :func:`mammut.load`.

Files (all optional; ``config.json`` lists the ones its save wrote under ``"companions"``, so a
stale file left by an earlier save into the same folder is never picked up):

- ``preprocess.json``: :meth:`mammut.preprocess.ImagePreprocess.to_dict`.
- ``mammut_tokenizer.json``: which tokenizer and its context length,
  ``{"format": "mammut.tokenizer", "format_version": 1, "kind": ..., "context_length": ...}``.
  ``kind="bpe"`` (:class:`mammut.tokenizer.Tokenizer`, a run's byte-level BPE): the
  vocabulary is the Hugging Face ``tokenizer.json`` written beside it (``"file"``) and the
  record keeps the special ids (``pad_id``, ``bos_id``, ``eos_id``), so ids given explicitly
  at construction survive. ``kind="clip"`` (:class:`mammut.clip_tokenizer.CLIPTokenizer`):
  nothing else is written; the vocabulary (``bpe_simple_vocab_16e6.txt.gz``, 49408 ids) is
  the one inside the installed open-clip-torch wheel, which the tokenizer's code needs anyway
  (text cleaning), so loading works offline wherever the ``interop`` extra is installed. The
  record names the vocabulary file and its sha256, checked on load (a different vocabulary
  would give different ids).

The name ``mammut_tokenizer.json`` (not ``tokenizer_config.json``) keeps clear of the files
Hugging Face ``transformers`` reads from the same folder of a Hub repository.

Both tokenizers and the preprocessing are library modules (:mod:`mammut.tokenizer`,
:mod:`mammut.clip_tokenizer`, :mod:`mammut.preprocess`), imported when used.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from ..io.atomic import atomic_write, atomic_write_text, sha256_file

__all__ = ["PREPROCESS_NAME", "TOKENIZER_RECORD_NAME", "TOKENIZER_FILE", "check_companions", "save_companions", "load_preprocess",
           "load_tokenizer", "companion_paths"]

log = logging.getLogger(__name__)

PREPROCESS_NAME = "preprocess.json"
TOKENIZER_RECORD_NAME = "mammut_tokenizer.json"
TOKENIZER_FILE = "tokenizer.json"
_FORMAT = "mammut.tokenizer"


def check_companions(preprocess: Any = None, tokenizer: Any = None) -> None:
    """``TypeError`` unless ``preprocess`` / ``tokenizer`` are None or of a kind that can be saved."""
    from ..preprocess import ImagePreprocess

    if preprocess is not None and not isinstance(preprocess, ImagePreprocess):
        raise TypeError(f"preprocess: expected a mammut.ImagePreprocess (what mammut.load returns), got {type(preprocess).__name__}")
    if tokenizer is not None and _tokenizer_kind(tokenizer) is None:
        raise TypeError(
            "tokenizer: expected a mammut.data.tokenizer.Tokenizer or a mammut.convert.clip_tokenizer.CLIPTokenizer, "
            f"got {type(tokenizer).__name__}"
        )


def _tokenizer_kind(tokenizer: Any) -> str | None:
    from ..clip_tokenizer import CLIPTokenizer

    if isinstance(tokenizer, CLIPTokenizer):
        return "clip"
    try:
        from ..tokenizer import Tokenizer
    except ImportError:  # without `tokenizers` no object can be a Tokenizer
        return None
    return "bpe" if isinstance(tokenizer, Tokenizer) else None


def save_companions(directory: Path, preprocess: Any = None, tokenizer: Any = None) -> dict[str, str]:
    """Write the given preprocessing and tokenizer to ``directory``; returns ``{"preprocess":
    file, "tokenizer": file}`` for the ones written (``config.json``'s ``"companions"``)."""
    check_companions(preprocess, tokenizer)
    out: dict[str, str] = {}
    if preprocess is not None:
        preprocess.save(directory / PREPROCESS_NAME)
        out["preprocess"] = PREPROCESS_NAME
    if tokenizer is not None:
        record = _tokenizer_record(tokenizer, directory)
        atomic_write_text(directory / TOKENIZER_RECORD_NAME, json.dumps(record, indent=2) + "\n")
        out["tokenizer"] = TOKENIZER_RECORD_NAME
    return out


def _tokenizer_record(tokenizer: Any, directory: Path) -> dict[str, Any]:
    record: dict[str, Any] = {"format": _FORMAT, "format_version": 1}
    if _tokenizer_kind(tokenizer) == "clip":
        path = tokenizer.bpe_path
        return {**record, "kind": "clip", "context_length": tokenizer.context_length,
                "vocab": path.name, "vocab_sha256": sha256_file(path)}
    atomic_write(directory / TOKENIZER_FILE, lambda tmp: tokenizer.hf.save(str(tmp)))
    return {**record, "kind": "bpe", "file": TOKENIZER_FILE, "context_length": tokenizer.context_length,
            "pad_id": tokenizer.pad_id, "bos_id": tokenizer.bos_id, "eos_id": tokenizer.eos_id}


def companion_paths(directory: Path, document: dict[str, Any]) -> dict[str, Path]:
    """The companion files of a checkpoint: those its ``config.json`` lists; for a checkpoint
    written before the list existed (no ``"companions"`` key), the files present by name, a
    bare ``tokenizer.json`` (what ``mammut train`` exported beside ``<run>/model`` before) as the
    tokenizer when there is no ``mammut_tokenizer.json``."""
    listed = document.get("companions")
    if listed is None:
        found = {"preprocess": directory / PREPROCESS_NAME, "tokenizer": directory / TOKENIZER_RECORD_NAME}
        if not found["tokenizer"].is_file():
            found["tokenizer"] = directory / TOKENIZER_FILE
        return {k: p for k, p in found.items() if p.is_file()}
    if not isinstance(listed, dict) or not all(isinstance(v, str) for v in listed.values()):
        raise ValueError(f"{directory / 'config.json'}: companions: expected an object of file names, got {listed!r}")
    out = {}
    for key, name in listed.items():
        path = directory / name
        if not path.is_file():
            raise FileNotFoundError(f"{directory}: config.json lists {key} file {name!r}, which is missing")
        out[key] = path
    return out


def load_preprocess(path: Path) -> Any:
    """The :class:`~mammut.preprocess.ImagePreprocess` of a ``preprocess.json``."""
    from ..preprocess import ImagePreprocess

    return ImagePreprocess.load(path)


def load_tokenizer(path: Path) -> Any:
    """The tokenizer a ``mammut_tokenizer.json`` describes (with its context length); a bare
    Hugging Face ``tokenizer.json`` gives a :class:`~mammut.tokenizer.Tokenizer` without a
    default context length (``tokenizer(texts, context_length)`` then needs one)."""
    record = _read_json(path)
    if "format" not in record and "model" in record:  # a Hugging Face tokenizer.json
        from ..tokenizer import Tokenizer

        log.info("%s: a tokenizer.json without mammut_tokenizer.json: no default context_length", path)
        return Tokenizer.from_file(path)
    if record.get("format") != _FORMAT or record.get("format_version") != 1:
        raise ValueError(f"{path}: expected a {_FORMAT} record of format_version 1, got format={record.get('format')!r}, "
                         f"format_version={record.get('format_version')!r}")
    kind, length = record.get("kind"), record.get("context_length")
    if length is not None and (isinstance(length, bool) or not isinstance(length, int) or length < 3):
        raise ValueError(f"{path}: context_length: expected null or an int >= 3, got {length!r}")
    if kind == "clip":
        from ..clip_tokenizer import CLIPTokenizer

        tok = CLIPTokenizer(context_length=76 if length is None else length)
        want = record.get("vocab_sha256")
        if isinstance(want, str) and sha256_file(tok.bpe_path) != want:
            raise ValueError(f"{path}: the installed open_clip's {tok.bpe_path.name} differs from the vocabulary this "
                             f"checkpoint was saved with (sha256 {want[:12]}...); install the open-clip-torch it used")
        return tok
    if kind == "bpe":
        from ..tokenizer import Tokenizer

        name = record.get("file", TOKENIZER_FILE)
        if not isinstance(name, str):
            raise ValueError(f"{path}: file: expected a file name, got {name!r}")
        ids = {k: record.get(f"{k}_id") for k in ("pad", "bos", "eos")}
        for k, v in ids.items():
            if v is not None and (isinstance(v, bool) or not isinstance(v, int)):
                raise ValueError(f"{path}: {k}_id: expected null or an int, got {v!r}")
        return Tokenizer.from_file(path.parent / name, pad=ids["pad"], bos=ids["bos"], eos=ids["eos"], context_length=length)
    raise ValueError(f"{path}: kind: expected 'bpe' or 'clip', got {kind!r}")


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data
