"""fashion-lightning: Lightning + Hydra multi-task attribute classifiers and CLIP retrieval for fashion catalogs."""

from fashion_lightning.data.schema import register_resolvers

register_resolvers()  # ${schema:...} in the packaged configs
