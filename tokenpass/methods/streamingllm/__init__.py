"""StreamingLLM KV eviction (see ``rewrite.py``)."""

from tokenpass.methods.streamingllm.rewrite import StreamingLLM

__all__ = ["StreamingLLM"]
