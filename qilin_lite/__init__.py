"""qilin-lite: two-stage (align, tune) training and inference for Chinese medical vision-language models."""

__version__ = "0.1.0"
