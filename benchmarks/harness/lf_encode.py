"""LLaMA-Factory's own preprocessing of a training config's dataset, run in LLaMA-Factory's environment (never
imported by qilin-lite): what its trainer would read, and how long its dataset map takes.

In:  argv: a LLaMA-Factory training config (JSON), how many records to return, an output JSON path.
Out: `{"seconds": the get_dataset wall time (tokenizing every record and counting its image tokens, the work done
     before training), "records": N, "first": [{"input_ids", "labels"} of the first records]}`.
"""

import json
import sys
import time

from llamafactory.data import get_dataset, get_template_and_fix_tokenizer
from llamafactory.hparams import get_train_args
from llamafactory.model import load_tokenizer


def main() -> None:
    cfg, k, out = json.loads(open(sys.argv[1], encoding="utf-8").read()), int(sys.argv[2]), sys.argv[3]
    model_args, data_args, training_args, _, _ = get_train_args(cfg)
    module = load_tokenizer(model_args)
    template = get_template_and_fix_tokenizer(module["tokenizer"], data_args)
    t0 = time.perf_counter()
    ds = get_dataset(template, model_args, data_args, training_args, stage="sft", **module)["train_dataset"]
    seconds = time.perf_counter() - t0
    first = [{"input_ids": list(ds[i]["input_ids"]), "labels": list(ds[i]["labels"])} for i in range(k)]
    with open(out, "w", encoding="utf-8") as f:
        json.dump({"seconds": seconds, "records": len(ds), "first": first}, f)


if __name__ == "__main__":
    main()
