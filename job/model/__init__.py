"""The model: where it comes from, loading it, its adapter and the modules that speed up its training."""
