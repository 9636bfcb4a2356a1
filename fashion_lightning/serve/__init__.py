"""fashion-serve's library: the recommendation service (FastAPI) and its shop page, over one index folder.

``create_app(recommender, image_reader)`` builds the app (:mod:`.app`: routers in :mod:`.routes` made from one
:class:`~.state.ServeState`); ``fashion-serve index_dir=...`` (the app :mod:`fashion_lightning.apps.serve`)
loads the index and its model once and runs it under uvicorn (:mod:`.server`).
"""

from fashion_lightning.serve.app import create_app
from fashion_lightning.serve.limits import ServeSettings
from fashion_lightning.serve.schemas import RecommendRequest

__all__ = ["RecommendRequest", "ServeSettings", "create_app"]
