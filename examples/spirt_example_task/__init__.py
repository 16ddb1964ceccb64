"""An example of a task of one's own for SPIRT (README.md, "Bring your own model").

``blobs.py`` is the task; ``data.py`` writes its dataset. Put ``examples/`` on
``PYTHONPATH`` and list ``spirt_example_task`` in the node's ``task_modules``.
"""
