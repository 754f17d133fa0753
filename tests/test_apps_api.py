"""The JSON API of ``mammut serve`` through FastAPI's TestClient: search by text and by image,
captions, images by id only, the OpenAPI schema, and bad input answered with a 4xx while the
server keeps serving."""

from __future__ import annotations

import asyncio
import io
import json
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from mammut.apps.build import BuildOptions, build
from mammut.apps.encoder import load_encoder
from mammut.apps.searcher import SearchIndex
from mammut.apps.server import create_app
from mammut.apps.store import MetadataStore
from test_apps_support import NAMES, PALETTE, ColourEncoder, colour_folder, train_tiny


@pytest.fixture(scope="module")
def index_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("api")
    pics = colour_folder(root / "pics", corrupt=1)
    (root / "pics" / "secret.txt").write_text("not to be served")
    build(BuildOptions(out=root / "idx", source=str(pics), chunk_size=4, progress=False), ColourEncoder())
    return root / "idx"


@pytest.fixture()
def client(index_dir) -> TestClient:
    return TestClient(create_app(SearchIndex(index_dir), ColourEncoder(), max_upload_bytes=20_000, max_k=50),
                      base_url="http://127.0.0.1")


def _png(colour: str, size: tuple[int, int] = (30, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, PALETTE[colour]).save(buf, format="PNG")
    return buf.getvalue()


def test_text_search_puts_the_named_colour_first(client):
    r = client.get("/api/search", params={"q": "  something orange ", "k": 3})
    assert r.status_code == 200
    body = r.json()
    assert body["query"] == "something orange" and body["k"] == 3 and len(body["results"]) == 3
    first = body["results"][0]
    assert first["name"] == "orange-0.png" and first["score"] > body["results"][1]["score"]
    assert set(first) == {"id", "name", "caption", "width", "height", "score", "image_url"}  # no path
    image = client.get(first["image_url"])
    assert image.status_code == 200 and image.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(image.content)).getpixel((0, 0)) == PALETTE["orange"]


def test_image_search_and_captions(client):
    r = client.post("/api/search/image", params={"k": 2}, files={"file": ("q.png", _png("green"), "image/png")})
    assert r.status_code == 200 and r.json()["results"][0]["name"] == "green-0.png"
    r = client.post("/api/caption", files={"file": ("q.png", _png("blue"), "image/png")})
    assert r.status_code == 200 and r.json() == {"id": None, "caption": "a blue picture"}
    yellow = client.get("/api/search", params={"q": "yellow", "k": 1}).json()["results"][0]["id"]
    r = client.post(f"/api/images/{yellow}/caption")
    assert r.status_code == 200 and r.json() == {"id": yellow, "caption": "a yellow picture"}
    assert client.post(f"/api/images/{yellow}/caption").json()["caption"] == "a yellow picture"  # from the cache


def test_info_page_and_openapi(client):
    info = client.get("/api/info").json()
    assert info["size"] == len(NAMES) and info["index"] == "flat" and info["max_k"] == 50
    page = client.get("/")
    assert page.status_code == 200 and "<title>mammut search</title>" in page.text
    schema = client.get("/openapi.json").json()
    paths = schema["paths"]
    assert {"/api/search", "/api/search/image", "/api/caption", "/api/images/{image_id}",
            "/api/images/{image_id}/caption", "/api/info"} <= set(paths)
    assert paths["/api/search"]["get"]["responses"]["200"]["content"]["application/json"]["schema"] == \
        {"$ref": "#/components/schemas/SearchResponse"}


@pytest.mark.parametrize(
    ("method", "url", "kwargs", "status", "detail"),
    [
        ("get", "/api/search", {"params": {"q": "   "}}, 422, "q: expected a non-empty query, got ''"),
        ("get", "/api/search", {"params": {"q": "red", "k": 0}}, 422, "k: expected an int in [1, 50], got 0"),
        ("get", "/api/search", {"params": {"q": "red", "k": 10**12}}, 422, "k: expected an int in [1, 50]"),
        ("get", "/api/search", {"params": {"q": "x" * 1001}}, 422, "q: expected at most 1000 characters"),
        ("post", "/api/search/image", {"files": {"file": ("a.png", b"plain text", "image/png")}}, 400,
         "file: expected an image file"),
        ("post", "/api/caption", {"files": {"file": ("a.png", b"", "image/png")}}, 400, "got an empty upload"),
        ("post", "/api/caption", {"files": {"file": ("big.png", b"\x89PNG" + b"0" * 30_000, "image/png")}}, 413,
         "file: expected an image of at most 20000 bytes"),
        ("get", "/api/images/9999", {}, 404, "id: no image 9999 in this index"),
        ("post", "/api/images/9999/caption", {}, 404, "id: no image 9999 in this index"),
    ],
)
def test_bad_input_is_a_clear_4xx_and_the_server_keeps_serving(client, method, url, kwargs, status, detail):
    r = getattr(client, method)(url, **kwargs)
    assert r.status_code == status and detail in r.json()["detail"], r.text
    assert client.get("/api/search", params={"q": "red", "k": 1}).json()["results"][0]["name"] == "red-0.png"


def test_pixel_bombs_and_missing_fields_are_refused(client):
    buf = io.BytesIO()
    Image.new("1", (8000, 6000)).save(buf, format="PNG")  # a small file of 48 million pixels
    assert len(buf.getvalue()) < 20_000
    r = client.post("/api/caption", files={"file": ("bomb.png", buf.getvalue(), "image/png")})
    assert r.status_code == 413 and "at most 40000000 pixels, got 8000x6000" in r.json()["detail"]
    assert client.post("/api/caption").status_code == 422
    assert client.get("/api/search").status_code == 422


def test_no_request_reads_a_file_outside_the_collection(client, index_dir):
    corrupt = [r.id for r in MetadataStore(index_dir).get(range(100)).values() if r.status == "corrupt"]
    assert len(corrupt) == 1 and client.get(f"/api/images/{corrupt[0]}").status_code == 404  # listed, unreadable
    for url in ["/api/images/../../pics/secret.txt", "/api/images/..%2Fsecret.txt", "/api/images/-1",
                "/api/images/1.5", f"/api/images/{index_dir / 'metadata.sqlite'}", "/static/../index.json",
                "/api/images/%2e%2e%2fmetadata.sqlite"]:
        r = client.get(url)
        assert r.status_code in (404, 422), (url, r.status_code)
        assert b"not to be served" not in r.content and b"SQLite" not in r.content


def test_a_chunked_upload_over_the_limit_is_refused_while_it_arrives(client):
    head = _multipart(b"")[:-len(b"\r\n--b--\r\n")]  # a file part that goes on and on

    def body():  # no Content-Length: the size is only known by counting what arrives
        yield head
        for _ in range(100):
            yield b"x" * 10_000

    r = client.post("/api/caption", content=body(), headers={"Content-Type": "multipart/form-data; boundary=b"})
    assert "content-length" not in r.request.headers
    assert r.status_code == 413, r.text
    assert r.json()["detail"] == "file: expected an image of at most 20000 bytes, got a request of more than 85536 bytes"
    assert client.get("/api/search", params={"q": "red", "k": 1}).json()["results"][0]["name"] == "red-0.png"
    ok = client.post("/api/caption", content=iter([_multipart(_png("blue"))]),
                     headers={"Content-Type": "multipart/form-data; boundary=b"})
    assert ok.status_code == 200 and ok.json()["caption"] == "a blue picture"  # a small chunked upload is fine

    # at the ASGI level: the app stops pulling the body soon after the limit, it does not take it all
    pulled, sent = [], []

    async def receive():
        pulled.append(1)
        return {"type": "http.request", "body": head if len(pulled) == 1 else b"x" * 10_000, "more_body": len(pulled) < 1000}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": "/api/caption", "raw_path": b"/api/caption", "root_path": "", "query_string": b"",
             "headers": [(b"host", b"127.0.0.1"), (b"content-type", b"multipart/form-data; boundary=b")],
             "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80)}
    asyncio.run(client.app(scope, receive, send))
    assert sent[0]["type"] == "http.response.start" and sent[0]["status"] == 413
    assert len(pulled) <= 10  # 20 KB + 64 KB allowed: 9 chunks of 10 KB, not 1000
    assert json.loads(b"".join(m.get("body", b"") for m in sent))["detail"].startswith("file: ")


def _multipart(data: bytes) -> bytes:
    return (b'--b\r\nContent-Disposition: form-data; name="file"; filename="q.png"\r\n'
            b"Content-Type: image/png\r\n\r\n" + data + b"\r\n--b--\r\n")


@pytest.mark.parametrize("url", [f"/api/images/{2**63}", f"/api/images/{10**30}", "/api/images/-5"])
def test_an_id_out_of_range_is_a_422(client, url):
    assert client.get(url).status_code == 422
    r = client.post(f"{url}/caption")
    assert r.status_code == 422 and "image_id" in r.text
    assert client.get(f"/api/images/{2**63 - 1}").status_code == 404  # the largest id: asked, not there


def test_requests_naming_another_host_are_refused(client, index_dir):
    assert client.get("/api/info", headers={"Host": "attacker.example"}).status_code == 400  # DNS rebinding
    assert client.get("/api/info", headers={"Host": "localhost:8000"}).status_code == 200
    lan = TestClient(create_app(SearchIndex(index_dir), ColourEncoder(), allowed_hosts=["photos.lan"]),
                     base_url="http://photos.lan")
    assert lan.get("/api/info").status_code == 200
    assert lan.get("/api/info", headers={"Host": "127.0.0.1"}).status_code == 400


def test_a_real_model_captions_with_kv_cached_generation(tmp_path):
    run = train_tiny(tmp_path / "run")
    pics = colour_folder(tmp_path / "pics")
    encoder = load_encoder(run)
    build(BuildOptions(out=tmp_path / "idx", source=str(pics), progress=False), encoder)
    client = TestClient(create_app(SearchIndex(tmp_path / "idx"), encoder), base_url="http://localhost")
    hits = client.get("/api/search", params={"q": "a red square", "k": 5}).json()["results"]
    assert len(hits) == 5 and all(-1.0 <= h["score"] <= 1.0 for h in hits)
    r = client.post(f"/api/images/{hits[0]['id']}/caption")
    assert r.status_code == 200 and isinstance(r.json()["caption"], str)
    expected = encoder.caption(encoder.preprocess(Image.open(pics / hits[0]["name"]).convert("RGB"))[None])[0]
    assert r.json()["caption"] == expected  # the model's own greedy caption
    r = client.post("/api/search/image", files={"file": ("q.png", _png("red"), "image/png")})
    assert r.status_code == 200 and r.json()["results"][0]["score"] == pytest.approx(1.0, abs=2e-3)  # red-0.png's twin
