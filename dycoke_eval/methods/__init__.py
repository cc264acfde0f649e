"""Compression methods: one small class per file, configured from `conf/method/<name>.yaml`."""

from dycoke_eval.methods.base import CompressionMethod, GenerationContext

__all__ = ["CompressionMethod", "GenerationContext"]
