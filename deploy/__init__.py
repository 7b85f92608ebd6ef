"""The tailord application: daemon loop, CLI, settings, logs, metrics, HTTP API, checkpoints."""
