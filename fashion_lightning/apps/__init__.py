"""The apps: one Hydra entry point per command (``fashion-train`` ... ``fashion-serve``), nothing else.

Each module here is a thin entry point, as lightning-hydra-template's ``src/train.py``: a task function
``f(cfg)`` under :func:`~fashion_lightning.utils.task_wrapper.task_wrapper` that calls into the library
layers below, and a ``main`` that Hydra runs, where user errors become one line on stderr and exit status 2
(:func:`~fashion_lightning.utils.app.one_line_errors`). ``python -m fashion_lightning.apps.<name>`` runs one.
"""
