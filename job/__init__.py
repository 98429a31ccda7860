"""ftjob: fine-tune causal language models as a batch job (spec in, adapter out)."""

__version__ = "0.1.0"
