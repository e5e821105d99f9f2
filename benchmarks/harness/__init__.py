"""What several benchmarks share; the measurements themselves are the modules one folder up.

- synth.py: a small Llava built from config and LLaVA records with ChiMed-VL-shaped text lengths;
- lengths.py: the fitted ChiMed-VL length distributions, the samplers' batches, the real-token fraction;
- probe.py: `Probe` and `instrumented`: each optimizer step of a Trainer split into data wait, forward + loss,
  backward, optimizer and the rest;
- probe_site/sitecustomize.py: the same step profile for a Trainer in another process (via PYTHONPATH);
- llama_cpp.py: `LlamaCppLlava`, a GGUF model + mmproj answering in llama.cpp (also used by the GGUF tests).

`RESULTS` is where measurements keep what they publish (benchmarks/results/, one JSON file per measurement).
"""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]  # the repository
RESULTS = ROOT / "benchmarks" / "results"
