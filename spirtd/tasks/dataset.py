"""Where a task's data lives. Light on purpose (no torch): the training service
checks a job record against it before it imports the task."""

from __future__ import annotations

# The task option a node sets to its ``--dataset NAME=DIR`` directory. A job
# never carries it: where the data lives is each node's own configuration.
DATASET_OPTION = "path"
