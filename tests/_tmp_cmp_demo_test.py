import json, sys
sys.path.insert(0, "/work/main/tests")
import pytest
def test_cmp(qlora_run, align_run, tiny_data):
    from qilin_lite.demo.run import score
    from qilin_lite.evaluate import score_demo_heldout, model_generate, load_eval_items
    held = json.loads(open(tiny_data["heldout"]).read())
    for run, tmpl in ((qlora_run, None), (align_run, "vicuna_v1")):
        a = score(run, held, tiny_data["images"], template=tmpl)
        b = score_demo_heldout(run, tiny_data["heldout"], tiny_data["images"], template=tmpl)
        print("\nDEMO", a, "\nEVAL", b)
    items = load_eval_items(tiny_data["heldout"], "llava", tiny_data["images"])
    print(model_generate(qlora_run, max_new_tokens=8, batch_size=16, dtype="float32")(items))
