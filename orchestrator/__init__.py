"""fleet-orchestrator: exactly-once firmware rollouts through the IoT platform's northbound API."""

__version__ = "0.1.0"
