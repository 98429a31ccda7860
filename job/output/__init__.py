"""output.uri: checkpoints, the lease, one-shot restarts, the metric curve and what is published there."""
