"""Worker initializers for fashion-serve's supervision tests: spawned processes import this module by name
(tests/unit is on the parent's sys.path, which spawn hands to its children)."""

from __future__ import annotations

import time
from typing import Any


def load_fake(delay_s: float = 0.0) -> None:
    """Initializer: the worker's model is the recommender tests' fake, one forward pass ``delay_s`` long
    (what ``inference._load`` does with a real model)."""
    from test_recommender import FakeEncoder

    from fashion_lightning.serve import inference

    class SlowFakeEncoder(FakeEncoder):
        def embed_and_predict(self, images: Any) -> tuple[Any, dict[str, list[str]]]:
            time.sleep(delay_s)  # long enough for a test to kill the worker mid-call
            return self.embed_images(images), self.predict_attributes(images)

    inference._ENCODER = SlowFakeEncoder()
    inference._ERROR = None


def nothing() -> None:
    """Initializer that loads nothing (pool-level tests)."""
