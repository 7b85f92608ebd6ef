"""The tailord application: daemon loop, CLI, settings, logs, metrics, HTTP API, checkpoints.

Importing it sets ``OMP_WAIT_POLICY=PASSIVE`` (unless the environment sets it) before any
module here loads torch and its OpenMP runtime: the training step, the indexer, the
experience-end evaluator and decoding all run torch ops on the same cores, and OpenMP
threads that spin between parallel regions took the step's cycles. Measured on 2 cores
(docs/scaling.md, "OpenMP threads that sleep"): daemon 74-76 -> 95-101 images/s, and the
bare step is not slower.
"""

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
