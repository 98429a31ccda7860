"""ftjob: fine-tune causal language models as a batch job (spec in, adapter out)."""

from job.startup import refuse_hub_kernels

__version__ = "0.1.0"

refuse_hub_kernels()  # first of all, before any library that would fetch code from a hub is imported
