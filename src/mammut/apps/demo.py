"""The demo collection: the held-out emoji scenes of an emoji run (scenes whose emoji pairs the
model never saw in training), written as PNG files with a ``captions.csv``, ready to index.

``mammut index --demo-heldout RUN`` indexes them into ``RUN/search-index``; ``mammut serve RUN``
does so on first use, so the page works right after ``make demo``.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
from PIL import Image

log = logging.getLogger(__name__)

__all__ = ["DEMO_INDEX", "is_run_folder", "write_heldout_scenes"]

DEMO_INDEX = "search-index"  # RUN/search-index
SCENES = "heldout-scenes"  # RUN/search-index/heldout-scenes/*.png + captions.csv


def is_run_folder(path: str | Path) -> bool:
    return (Path(path).expanduser() / "config.yaml").is_file()


def write_heldout_scenes(run: str | Path, out: str | Path, n: int = 512) -> Path:
    """Write the first ``n`` held-out scenes of ``run`` (distinct captions, as the evaluation
    picks them) to ``out``; returns the ``captions.csv`` listing them. Files already there are kept."""
    import yaml

    from ..data.scenes import EmojiScenes
    from ..data.sources import DATA_SEED
    from ..train.config import config_from_dict

    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"--n: expected an int >= 1, got {n!r}")
    run = Path(run).expanduser()
    if not is_run_folder(run):
        raise FileNotFoundError(f"--demo-heldout: expected a run folder with config.yaml, got {run}")
    data = config_from_dict(yaml.safe_load((run / "config.yaml").read_text())).data
    if data.kind != "emoji":
        raise ValueError(f"--demo-heldout: held-out scenes exist for emoji runs, got data.kind={data.kind!r} in {run}")
    ds = EmojiScenes(data.image_size, data.num_emoji, data.max_objects, split="heldout", seed=DATA_SEED,
                     min_objects=data.min_objects, vocab_seed=data.vocab_seed)
    folder = Path(out).expanduser()
    folder.mkdir(parents=True, exist_ok=True)
    rows, seen, i = ["filepath,title"], set(), 0
    while len(rows) <= n and i < 20 * n + 1000:
        scene = ds.scene(i)
        i += 1
        if scene.caption in seen:  # one image per caption, so a caption query has one right answer
            continue
        seen.add(scene.caption)
        name = f"scene-{scene.index:05d}.png"
        if not (folder / name).is_file():
            pixels = (scene.image.permute(1, 2, 0).numpy() * 255.0).round().clip(0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(folder / name)
        rows.append(f'{name},"{scene.caption}"')
    path = folder / "captions.csv"
    path.write_text("\n".join(rows) + "\n", encoding="utf-8")
    log.info("wrote %d held-out scenes of %s to %s", len(rows) - 1, run, folder)
    return path
