"""Where the query is in each search result (issue 25, point 5): ``mammut serve`` over an index
built with an open-vocabulary detector (a ``detection`` run) answers
``/api/images/{id}/locate?q=...`` with the boxes ``mammut detect`` finds, and the page draws them
over the results; a model that cannot locate text answers a clear 400, and its page neither
asks nor draws anything (``test_apps_browser``)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

from mammut.apps.build import BuildOptions, build
from mammut.apps.encoder import ModelEncoder, load_encoder
from mammut.apps.searcher import SearchIndex
from mammut.apps.server import create_app
from test_apps_support import NAMES, PALETTE, ColourEncoder, colour_folder, serving

WHITE = PALETTE["white"]


class LocatingColourEncoder(ColourEncoder):
    """A :class:`ColourEncoder` that locates: a query naming a palette colour is found at the
    bounding box of that colour's pixels, score 0.9."""

    can_locate = True

    def __init__(self) -> None:
        super().__init__()
        self.located = 0

    def locate(self, image: Image.Image, queries, *, threshold: float = 0.1, nms: float = 0.3,
               max_detections: int = 20) -> list[dict]:
        self.located += 1
        arr = np.asarray(image.convert("RGB"), dtype=np.int16)
        found = []
        for q in queries:
            for name in NAMES:
                ys, xs = (np.abs(arr - np.array(PALETTE[name])).sum(-1) < 30).nonzero()
                if name in q.lower() and len(xs):
                    found.append({"query": q, "score": 0.9,
                                  "box": [float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)]})
        return [d for d in found if d["score"] >= threshold][:max_detections]


def _scene(path: Path, size: tuple[int, int], colour: str, box: tuple[int, int, int, int], **save) -> Path:
    """A white picture of ``size`` with a ``colour`` rectangle at ``box`` (x0, y0, x1, y1)."""
    img = Image.new("RGB", size, WHITE)
    img.paste(PALETTE[colour], box)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, **save)
    return path


@pytest.fixture(scope="module")
def scenes(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("boxes")
    _scene(root / "pics" / "wide.png", (40, 20), "red", (24, 6, 34, 16))
    _scene(root / "pics" / "tall.png", (20, 40), "blue", (4, 22, 14, 32))
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: shown turned 90 degrees clockwise
    _scene(root / "pics" / "turned.jpg", (40, 20), "red", (0, 0, 8, 20), exif=exif, quality=100, subsampling=0)
    colour_folder(root / "pics" / "solid")  # 8 more results: more than a small window shows
    build(BuildOptions(out=root / "idx", source=str(root / "pics"), progress=False), ColourEncoder())
    return root / "idx"


def _ids(client: TestClient) -> dict[str, int]:
    return {r["name"]: r["id"] for r in client.get("/api/search", params={"q": "red", "k": 20}).json()["results"]}


# ------------------------------------------------------------------------------ the API


@pytest.fixture(scope="module")
def detector_run(tmp_path_factory) -> tuple[Path, Path]:
    """A 2-step ``detection-tiny`` run (from scratch) and its held-out scenes indexed with it."""
    from mammut.cli import main
    from mammut.train.config import load_config
    from mammut.train.loop import Trainer

    tmp = tmp_path_factory.mktemp("detector")
    run = tmp / "run"
    Trainer(load_config("detection-tiny", ["--train.out_dir", str(run), "--train.steps", "2", "--train.progress",
                                           "false", "--train.report", "false", "--train.threads", "1"])).fit()
    assert main(["index", "--demo-heldout", str(run), "--n", "4", "--out", str(tmp / "idx"), "--no-progress",
                 "--precision", "fp32"]) == 0
    return run, tmp / "idx"


def test_a_detector_index_answers_where_the_query_is_as_mammut_detect_finds_it(detector_run):
    import mammut
    from mammut.apps.detect import detect_image

    run, idx = detector_run
    encoder = load_encoder(run, precision="fp32")
    assert encoder.can_locate
    client = TestClient(create_app(SearchIndex(idx), encoder), base_url="http://127.0.0.1")
    assert client.get("/api/info").json()["locate"] is True
    result = client.get("/api/search", params={"q": "a cat", "k": 2}).json()["results"][0]
    r = client.get(f"/api/images/{result['id']}/locate", params={"q": " a cat ", "threshold": 0, "max_boxes": 3})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["id"] == result["id"] and body["query"] == "a cat" and (body["width"], body["height"]) == (48, 48)
    assert len(body["boxes"]) == 3  # threshold 0: every token scores; NMS and max_boxes leave 3
    scores = [b["score"] for b in body["boxes"]]
    assert scores == sorted(scores, reverse=True)
    assert all(0 <= x0 < x1 <= 48 and 0 <= y0 < y1 <= 48 for x0, y0, x1, y1 in (b["box"] for b in body["boxes"]))
    # the very boxes of `mammut detect` (detect_image) on that image
    model, _, tokenizer = mammut.load(run)
    image = Image.open(io.BytesIO(client.get(result["image_url"]).content)).convert("RGB")
    direct = detect_image(model.eval(), tokenizer, image, ["a cat"], threshold=0, max_detections=3)
    assert [{"score": d["score"], "box": d["box"]} for d in direct] == body["boxes"]
    # the threshold keeps the boxes scoring at least it: the best one at its own score, none just above
    url = f"/api/images/{result['id']}/locate"
    best = client.get(url, params={"q": "a cat", "threshold": scores[0] - 1e-4}).json()["boxes"]
    assert best and best[0] == body["boxes"][0] and all(b["score"] >= scores[0] - 2e-4 for b in best)
    none = client.get(url, params={"q": "a cat", "threshold": min(1.0, scores[0] + 1e-3)}).json()
    assert none["boxes"] == [] and none["width"] == 48
    # bad input: 4xx naming the parameter
    for params, status, detail in [({"q": "  "}, 422, "q: expected a non-empty query"),
                                   ({"q": "a cat", "threshold": 1.5}, 422, "threshold: expected a score in [0, 1]"),
                                   ({"q": "a cat", "threshold": "nan"}, 422, "threshold: expected a score in [0, 1]"),
                                   ({"q": "a cat", "max_boxes": 0}, 422, "max_boxes: expected an int in [1, 100]")]:
        bad = client.get(f"/api/images/{result['id']}/locate", params=params)
        assert bad.status_code == status and detail in bad.json()["detail"], (params, bad.text)
    missing = client.get("/api/images/9999/locate", params={"q": "a cat"})
    assert missing.status_code == 404 and "id: no image 9999" in missing.json()["detail"]
    assert "/api/images/{image_id}/locate" in client.get("/openapi.json").json()["paths"]


def test_a_model_that_cannot_locate_answers_a_clear_400_and_computes_nothing(scenes):
    encoder = LocatingColourEncoder()
    encoder.can_locate = False
    client = TestClient(create_app(SearchIndex(scenes), encoder), base_url="http://127.0.0.1")
    assert client.get("/api/info").json()["locate"] is False
    r = client.get("/api/images/0/locate", params={"q": "red"})
    assert r.status_code == 400
    assert "cannot locate text in images" in r.json()["detail"] and "train.task: detection" in r.json()["detail"]
    assert encoder.located == 0


def test_only_an_open_vocabulary_detector_can_locate():
    from mammut.models import get_model_spec

    def wrap(model):
        return ModelEncoder(model, lambda im: im, lambda texts: torch.randint(3, 300, (len(texts), 6)), object(),
                            name="tiny")

    assert wrap(get_model_spec("mammut_detector").build_tiny()).can_locate
    closed = wrap(get_model_spec("mammut_detector").build_tiny(num_classes=7))  # learned classes: no free text
    plain = wrap(get_model_spec("mammut").build_tiny())
    assert not closed.can_locate and not plain.can_locate
    with pytest.raises(ValueError, match="cannot locate text in images: it is not an open-vocabulary detector"):
        plain.locate(Image.new("RGB", (8, 8)), ["a cat"])


def test_boxes_are_in_the_image_as_shown_exif_orientation_applied(scenes):
    encoder = LocatingColourEncoder()
    client = TestClient(create_app(SearchIndex(scenes), encoder), base_url="http://127.0.0.1")
    ids = _ids(client)
    wide = client.get(f"/api/images/{ids['wide.png']}/locate", params={"q": "the red one"}).json()
    assert (wide["width"], wide["height"]) == (40, 20) and wide["boxes"] == [{"score": 0.9, "box": [24, 6, 34, 16]}]
    # stored 40 x 20 with the red band on the left, shown turned clockwise: 20 x 40, the band on top
    turned = client.get(f"/api/images/{ids['turned.jpg']}/locate", params={"q": "red"}).json()
    assert (turned["width"], turned["height"]) == (20, 40) and turned["boxes"] == [{"score": 0.9, "box": [0, 0, 20, 8]}]
    assert client.get(f"/api/images/{ids['tall.png']}/locate", params={"q": "red"}).json()["boxes"] == []
    calls = encoder.located
    client.get(f"/api/images/{ids['wide.png']}/locate", params={"q": "the red one"})
    assert encoder.located == calls  # the same question again: from the cache


# ------------------------------------------------------------------------------ the page


def test_the_page_draws_the_boxes_over_each_result(scenes, tmp_path):
    from test_apps_browser import CHROMIUM, FLAGS, _need_chromium

    _need_chromium()
    from playwright.sync_api import expect, sync_playwright

    app = create_app(SearchIndex(scenes), LocatingColourEncoder())
    with serving(app) as url, sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=FLAGS)
        try:
            page = browser.new_page(viewport={"width": 900, "height": 400})
            page.set_default_timeout(20_000)
            page.goto(url)
            expect(page.locator("#locate-controls")).to_be_visible()
            page.fill("#query", "red")
            page.press("#query", "Enter")
            cards = page.locator(".card")
            expect(cards).to_have_count(11)
            # only results near the screen are asked about: the first is, the last (4 rows down) not yet
            expect(cards.first.locator(".where")).not_to_be_empty()
            assert cards.last.get_attribute("data-located") is None
            cards.last.scroll_into_view_if_needed()
            expect(cards.last.locator(".where")).not_to_be_empty()
            wide = page.locator(".card", has_text="wide.png")
            tall = page.locator(".card", has_text="tall.png")
            wide.scroll_into_view_if_needed()
            tall.scroll_into_view_if_needed()
            box = wide.locator(".box")
            expect(box).to_have_count(1)
            expect(box.locator(".box-score")).to_have_text("0.90")
            expect(tall.locator(".where")).to_have_text("not found above 0.10")
            expect(tall.locator(".box")).to_have_count(0)
            # the box sits on the red square of the 40 x 20 picture shown `contain` in its square frame
            wide.scroll_into_view_if_needed()
            img = wide.locator("img").bounding_box()
            got = box.bounding_box()
            side = img["width"]
            want = {"x": img["x"] + 24 / 40 * side, "y": img["y"] + side / 4 + 6 / 40 * side,
                    "width": 10 / 40 * side, "height": 10 / 40 * side}
            assert all(abs(got[k] - want[k]) <= 1.5 for k in want), (got, want)
            page.screenshot(path=str(tmp_path / "boxes.png"), full_page=True)

            page.uncheck("#show-boxes")  # the toggle hides them
            expect(box).to_be_hidden()
            page.check("#show-boxes")
            expect(box).to_be_visible()
            page.fill("#min-score", "0.95")  # a higher min score asks again: the 0.9 box goes
            page.dispatch_event("#min-score", "change")
            expect(wide.locator(".where")).to_have_text("not found above 0.95")
            expect(wide.locator(".box")).to_have_count(0)
            page.set_input_files("#file", str(scenes.parent / "pics" / "wide.png"))
            page.click("#search-image")  # a search by image has no query: no boxes
            expect(page.locator(".card").first).to_contain_text("wide.png")
            assert page.locator(".frame, .box").count() == 0
        finally:
            browser.close()
