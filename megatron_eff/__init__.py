"""megatron_eff: a Megatron-style LLM pretraining codebase that makes training cheaper."""

__version__ = "0.1.0"
