"""fashion-lightning: Lightning + Hydra multi-task attribute classifiers and CLIP retrieval for fashion catalogs."""

from fashion_lightning.data.schema import register_resolvers
from fashion_lightning.utils.cluster import register_resolvers as register_cluster_resolvers

register_resolvers()  # ${schema:...} in the packaged configs
register_cluster_resolvers()  # ${fl.run_name:...}, ${fl.rank_zero:...}: one run dir per launch, not per rank
