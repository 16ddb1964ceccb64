"""A seeded discrete-event simulator for sans-IO protocol machines.

``loop`` (simulated time), ``network`` (latency, jitter, loss, partitions),
``host`` (one machine per host; crash, pause, restart) are protocol-agnostic.
``membership_cluster`` drives membership machines and records their verdicts
against ground truth; ``scenarios`` are the acceptance runs, also reachable as
``python -m protocol.sim``.
"""
