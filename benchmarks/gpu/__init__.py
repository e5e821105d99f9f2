"""Benchmarks that need a CUDA GPU (each also runs at toy sizes on the CPU, as the tests do).

- check.py (run by check.sh; `bash scripts/gpu-check.sh` is the entry point): validates a lent GPU in one command;
- qlora_lora_steps.py: QLoRA and LoRA steps at the paper's 13B shapes: tokens/s, MFU, peak memory against the plan.
"""
