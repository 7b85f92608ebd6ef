"""Shared fixtures: the real embedded broker (no Kafka mocks anywhere)."""

import torch

from tests.kafka_fixtures import broker  # noqa: F401 - a fixture

torch.set_num_threads(1)  # tests share 2 cores with daemon subprocesses
