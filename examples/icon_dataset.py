"""A small real image-text data set from Debian's icon themes: train/val/test CSVs and a
zero-shot ImageFolder of icon categories.

    sudo apt-get install oxygen-icon-theme gnome-icon-theme tango-icon-theme   # adwaita-icon-theme: already there
    python examples/icon_dataset.py --out data/icons

Each icon theme files its PNGs as ``THEME/SIZE/CONTEXT/NAME.png``; the context folder says what
kind of icon it is (``devices``, ``places``, ``mimetypes`` ...) and the name what it shows
(``drive-harddisk-usb``). One pair per icon and theme, at the theme's size closest to 64 px
(64, then 48, 32, 22), with the caption ``"<kind> icon: <name words>"``, e.g. ``"device icon:
drive harddisk usb"``. Symbolic links (aliases of another icon) and byte-identical files are
dropped, so an image is listed once. Real files: RGBA PNGs with transparent backgrounds,
sizes that differ per theme, names in four naming styles.

Splits are by icon NAME (a hash of it), never by file: an icon held out is held out in every
theme, so no test image has a training twin drawn by another artist. ``test.csv`` is the
held-out retrieval set, ``val.csv`` the set ``train.keep_best`` chooses the checkpoint on
(never the test set), ``zeroshot-val/<kind>/`` every validation icon by kind (to choose options
on), and ``zeroshot/<kind>/`` the test icons by kind, at most
``--per-class`` of each (the kinds are unbalanced: file-type icons are 40 % of the themes), for
``mammut eval zeroshot RUN --data OUT/zeroshot --templates OUT/templates.txt``.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import shutil
import subprocess
from collections import Counter, defaultdict
from pathlib import Path

THEMES = {"oxygen": "/usr/share/icons/oxygen/base", "gnome": "/usr/share/icons/gnome",
          "Adwaita": "/usr/share/icons/Adwaita", "Tango": "/usr/share/icons/Tango"}
PACKAGES = ("oxygen-icon-theme", "gnome-icon-theme", "adwaita-icon-theme", "tango-icon-theme")
SIZES = ("64x64", "48x48", "32x32", "22x22")
KINDS = {"actions": "action", "apps": "application", "categories": "menu category", "devices": "device",
         "emblems": "emblem", "emotes": "emoticon", "mimetypes": "file type", "places": "place", "status": "status"}


def _split(name: str, val: float, test: float) -> str:
    u = int(hashlib.sha256(name.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
    return "test" if u < test else "val" if u < test + val else "train"


def _words(name: str) -> str:
    return " ".join(w for w in name.replace("_", "-").split("-") if w)


def collect(themes: dict[str, str]) -> list[dict[str, str]]:
    """One record per (theme, kind, icon name): the real file at the theme's best size."""
    found: dict[tuple[str, str, str], Path] = {}
    seen_bytes: set[str] = set()
    for theme, root in themes.items():
        base = Path(root)
        if not base.is_dir():
            print(f"skipped {theme}: {root} is not installed")
            continue
        for size in SIZES:
            for kind in KINDS:
                folder = base / size / kind
                if not folder.is_dir():
                    continue
                for f in sorted(folder.glob("*.png")):
                    key = (theme, kind, f.stem)
                    if key in found or f.is_symlink():
                        continue
                    digest = hashlib.sha256(f.read_bytes()).hexdigest()
                    if digest in seen_bytes:
                        continue
                    seen_bytes.add(digest)
                    found[key] = f
    return [{"theme": t, "kind": k, "name": n, "path": str(p)} for (t, k, n), p in sorted(found.items())]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--val", type=float, default=0.1, help="share of icon names for val.csv")
    p.add_argument("--test", type=float, default=0.15, help="share of icon names held out (test.csv, zeroshot/)")
    p.add_argument("--per-class", type=int, default=40, help="zero-shot images per kind at most")
    args = p.parse_args()
    out = Path(args.out)
    if out.exists():
        shutil.rmtree(out)
    (out / "images").mkdir(parents=True)
    records = collect(THEMES)
    if not records:
        raise SystemExit(f"no icons found: install {' '.join(PACKAGES)}")
    rows: dict[str, list[tuple[str, str]]] = defaultdict(list)
    by_kind: dict[str, list[tuple[str, Path]]] = defaultdict(list)
    for r in records:
        rel = Path("images") / r["theme"] / r["kind"] / f"{r['name']}.png"
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(r["path"], out / rel)
        split = _split(r["name"], args.val, args.test)
        rows[split].append((str(rel), f"{KINDS[r['kind']]} icon: {_words(r['name'])}"))
        if split == "test":
            by_kind[KINDS[r["kind"]]].append((f"{r['theme']}-{r['name']}.png", out / rel))
        elif split == "val":  # every validation icon by kind: choose options on it, never on zeroshot/
            dest = out / "zeroshot-val" / KINDS[r["kind"]] / f"{r['theme']}-{r['name']}.png"
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(out / rel, dest)
    for split in ("train", "val", "test"):
        with (out / f"{split}.csv").open("w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["filepath", "title"])
            w.writerows(rows[split])
    zs = Counter()
    for kind, files in sorted(by_kind.items()):
        files.sort(key=lambda item: hashlib.sha256(item[0].encode()).hexdigest())  # a fixed, name-blind sample
        for name, src in files[: args.per_class]:
            dest = out / "zeroshot" / kind / name
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, dest)
            zs[kind] += 1
    (out / "templates.txt").write_text("a {} icon\nan icon of a {}\n{} icon\n")
    versions = {}
    for pkg in PACKAGES:
        q = subprocess.run(["dpkg-query", "-W", "-f", "${Version}", pkg], capture_output=True, text=True)
        versions[pkg] = q.stdout.strip() or "not installed"
    summary = {"pairs": {s: len(v) for s, v in rows.items()}, "themes": Counter(r["theme"] for r in records),
               "kinds": Counter(KINDS[r["kind"]] for r in records), "zeroshot": dict(zs), "packages": versions}
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
