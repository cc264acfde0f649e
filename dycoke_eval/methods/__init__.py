"""Compression methods and stages: one small dataclass per file, configured from `conf/method/<name>.yaml`."""
