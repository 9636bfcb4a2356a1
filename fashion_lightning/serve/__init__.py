"""fashion-serve: the recommendation service (FastAPI) and its shop page, over one index folder.

``create_app(recommender, image_reader)`` builds the app; ``fashion-serve index_dir=...`` (see
:mod:`fashion_lightning.apps.serve`) loads the index and its model once and runs it under uvicorn.
"""

from fashion_lightning.serve.app import RecommendRequest, ServeSettings, create_app

__all__ = ["RecommendRequest", "ServeSettings", "create_app"]
