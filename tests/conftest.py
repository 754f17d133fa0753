import os

import pytest
import torch

torch.set_num_threads(int(os.environ.get("MAMMUT_TEST_THREADS", "1")))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


class TwoOnOneDetector(torch.nn.Module):
    """A stand-in detector for the detection post-processing tests: 3 tokens, 2 queries; tokens 0
    and 1 box the same object (IoU 0.82), token 2 another; ``image_size`` for ``mammut detect``."""

    image_size = 100

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))

    def query_embeds(self, queries):
        return queries

    def detect(self, images, queries):
        boxes = torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.31, 0.3, 0.2, 0.2], [0.7, 0.7, 0.2, 0.2]])  # cxcywh
        logits = torch.tensor([[3.0, 0.0], [2.0, 1.0], [-1.0, 2.5]])
        return {"boxes": boxes.expand(len(images), 3, 4), "logits": logits.expand(len(images), 3, 2)}


@pytest.fixture
def two_on_one() -> type[TwoOnOneDetector]:
    """The class of :class:`TwoOnOneDetector`."""
    return TwoOnOneDetector
