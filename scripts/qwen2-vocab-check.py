"""By hand, not in CI: are qilin-lite's Qwen2 tokenizer rules (demo/qwen.py: QWEN2_SPLIT + byte-level, NFC) right
on the REAL Qwen2 vocabulary?

Inputs, offline copies at the paths below: dashscope's `resources/qwen.tiktoken` (`pip download dashscope`: the 151,643
regular tokens Qwen and Qwen2 share), tiktoken (`pip install --target`), and llama.cpp's
models/ggml-vocab-qwen2.gguf.inp / .out (the ids llama.cpp's tests expect, made with HF's Qwen2 tokenizer).
It also writes the real-vocabulary tokenizer as Qwen2 ships it, for tests/data/huatuo/make_cases.py (HuatuoGPT-Vision's
cli.py in a transformers 4.40 scratch environment), whose ids are then compared with qilin-lite's prompt ids.
Result on 2026-12-03: 47 of 47 llama.cpp strings equal (tiktoken and the tokenizers BPE); 7 of 7 HuatuoGPT-Vision
prompts equal.
"""
import base64, json, subprocess, sys
sys.path.insert(0, "/tmp/qv/tk")
import tiktoken
from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, decoders
sys.path.insert(0, "/work/main")
from qilin_lite.demo.qwen import QWEN2_SPLIT

ranks = {}
for line in open("/tmp/qv/dashscope/resources/qwen.tiktoken", "rb"):
    tok, rank = line.split()
    ranks[base64.b64decode(tok)] = int(rank)
enc = tiktoken.Encoding("qwen", pat_str=QWEN2_SPLIT, mergeable_ranks=ranks,
                        special_tokens={"<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645})
# tiktoken ranks -> a byte-level BPE (vocab + merges) for `tokenizers`
bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
cs = bs[:]
n = 0
for b in range(256):
    if b not in bs:
        bs.append(b); cs.append(256 + n); n += 1
b2u = {b: chr(c) for b, c in zip(bs, cs)}
to_str = lambda bts: "".join(b2u[x] for x in bts)
vocab = {to_str(t): r for t, r in ranks.items()}
merges = []
for t, r in sorted(ranks.items(), key=lambda x: x[1]):
    if len(t) == 1:
        continue
    # every split of t into two tokens is a merge of priority rank(t): tiktoken merges the lowest-rank pair first
    for i in range(1, len(t)):
        a, b = t[:i], t[i:]
        if a in ranks and b in ranks and ranks[a] < r and ranks[b] < r:
            merges.append((to_str(a), to_str(b)))
tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=False))
tok.normalizer = normalizers.NFC()
tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated"),
                                             pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
tok.decoder = decoders.ByteLevel()
tok.add_special_tokens(["<|endoftext|>", "<|im_start|>", "<|im_end|>"])

git = lambda p: subprocess.run(["git", "-C", "/work/.mirror/ggerganov+llama.cpp/repo", "show", f"HEAD:{p}"],
                               capture_output=True, text=True).stdout
inp = git("models/ggml-vocab-qwen2.gguf.inp").split("\n__ggml_vocab_test__\n")
out = git("models/ggml-vocab-qwen2.gguf.out").split("\n")
same_tk = same_tok = 0
for s, o in zip(inp, out):
    want = [int(x) for x in o.split()]
    same_tk += enc.encode(s, allowed_special=set()) == want
    same_tok += tok.encode(s, add_special_tokens=False).ids == want
print(f"llama.cpp's Qwen2 cases: {len(inp)}; tiktoken with QWEN2_SPLIT equal: {same_tk}; tokenizers BPE with "
      f"demo/qwen.py's pre-tokenizer equal: {same_tok}")
# HuatuoGPT-Vision's prompt pieces on the real vocabulary: whole-string vs cli.py's piecewise tokenization
cases = json.load(open("/work/main/tests/data/huatuo/expected.json"))["cases"]
for text in ["<|user|>\n这张胸部X光片显示了什么？\n<|assistant|>\n", "右下肺野可见片状高密度影，考虑肺炎。 \n",
             "<|user|>\n病灶位于哪里？\n<|assistant|>\n"]:
    a = tok.encode(text, add_special_tokens=False).ids
    print(repr(text), a == enc.encode(text), a[:12])
for s, o in zip(inp, out):
    want = [int(x) for x in o.split()]
    got = tok.encode(s, add_special_tokens=False).ids
    if got != want:
        print("differs:", repr(s[:40]), got[:8], want[:8], enc.encode(s)[:8] == want[:8])

# the real-vocabulary tokenizer saved as Qwen2 ships it, for HuatuoGPT-Vision's cli.py (scratch, transformers 4.40)
# and for qilin-lite's own prompt ids
from pathlib import Path
d = Path("/tmp/qv/qwen2-real"); d.mkdir(exist_ok=True)
tok.save(str(d / "tokenizer.json"))
data = json.loads((d / "tokenizer.json").read_text()); data["model"]["merges"] = [" ".join(m) if not isinstance(m, str) else m for m in data["model"]["merges"]]
(d / "tokenizer.json").write_text(json.dumps(data, ensure_ascii=False))
added = {str(151643 + i): {"content": t, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
         "special": True} for i, t in enumerate(["<|endoftext|>", "<|im_start|>", "<|im_end|>"])}
(d / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "Qwen2Tokenizer", "added_tokens_decoder": added,
    "bos_token": None, "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>", "unk_token": None,
    "clean_up_tokenization_spaces": False, "model_max_length": 32768}))
print("saved", d)

# then: python tests/data/huatuo/make_cases.py /tmp/qv/qwen2-real /tmp/qv/expected-real.json  (scratch, 4.40)
real = Path("/tmp/qv/expected-real.json")
if real.is_file():
    import shutil
    import tempfile

    from qilin_lite.conversation import IMAGE_TOKEN, get_template, typed_text
    from qilin_lite.serve.generate import Generator
    from qilin_lite.model import load_tokenizer
    from qilin_lite.processing import TokenLayout

    tmp = Path(tempfile.mkdtemp())
    for f in d.glob("tokenizer*"):
        shutil.copy(f, tmp)
    qt = load_tokenizer(str(tmp))
    qt.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    img, t = qt.convert_tokens_to_ids(IMAGE_TOKEN), get_template("huatuo")
    gen = Generator(None, qt, None, t, TokenLayout(img, 576, 10**9))
    cases = json.loads(real.read_text())["cases"]
    ok = 0
    for c in cases:
        msgs = []
        for k, turn in enumerate(c["turns"]):
            msgs.append({"role": "user", "content": f"{IMAGE_TOKEN}\n" * turn["images"] + typed_text(turn["question"], t)})
            if k < len(c["answers"]):
                msgs.append({"role": "assistant", "content": c["answers"][k]})
        theirs = [x for i in c["ids"] for x in ([img] * 576 if i == -200 else [i])]
        ok += gen.prompt_ids(msgs).tolist() == theirs
    print(f"real Qwen2 vocabulary: huatuo prompt ids equal HuatuoGPT-Vision cli.py's for {ok} of {len(cases)} cases")
