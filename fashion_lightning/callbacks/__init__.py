"""Lightning callbacks and checkpoint IO: what a Trainer runs around any model family.

``evaluation`` (the shared evaluation protocol: metrics.json + plots), ``epoch_seed`` (exact resume) and
``checkpoint_io`` (atomic checkpoints); each is named by its module in ``conf/callbacks/`` so importing one
does not import the others.
"""
