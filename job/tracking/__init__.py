"""MLflow tracking through a write-ahead spool, and the system/* sampler."""
