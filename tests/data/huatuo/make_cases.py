"""Run HuatuoGPT-Vision's own cli.py (transformers 4.40) on the shipped tiny Qwen2-style tokenizer; write expected ids."""
import json, sys
sys.path.insert(0, "/tmp/scratch/hv/tf440")
sys.path.insert(0, "/tmp/scratch/hv/hv_repo")
import transformers
assert transformers.__version__ == "4.40.2", transformers.__version__
from cli import HuatuoChatbot
from transformers import AutoTokenizer

TOK = sys.argv[1]
bot = HuatuoChatbot.__new__(HuatuoChatbot)   # their methods, without loading a 7B model
bot.tokenizer = AutoTokenizer.from_pretrained(TOK)
bot.tokenizer.pad_token_id = bot.tokenizer.eos_token_id
bot.history, bot.images, bot.debug, bot.max_image_num = [], [], False, 6
print(type(bot.tokenizer).__name__, file=sys.stderr)

def first_turn(text, n):
    # HuatuoChatbot.inference: moderation, placeholders, a conversation without history
    t = bot.input_moderation(text)
    t = bot.insert_image_placeholder(t, n)
    return bot.preprocess(bot.get_conv_without_history(t), return_tensors=None)

def preprocess_list(conv):
    ids = bot.preprocess(conv, return_tensors="pt")
    return [int(x) for x in ids.tolist()]

cases = []
for name, text, n in [
    ("one image", "这张胸部X光片显示了什么？", 1),
    ("two images", "请比较这两张图像的差异。", 2),
    ("six images", "What does the picture show?", 6),
    ("no image", "病灶位于哪里？", 0),
    ("typed tags and spaces", "  <image>Is there any </s>abnormality?<s>  ", 1),
    # moderation's one pass leaves `<s>` spelt: text, which cli.py keeps
    ("nested end tags", "<</s>s>这是什么？", 1),
    # ... and leaves `<image>` spelt, which cli.py splits into one image slot more than there are images (3 for 2):
    # its prompt is invalid here; "text_image" is what that `<image>` is as text in its tokenizer
    ("nested image tag", "<<image>image>是什么？", 2),
]:
    t = bot.insert_image_placeholder(bot.input_moderation(text), n)
    ids = preprocess_list(bot.get_conv_without_history(t))
    cases.append({"name": name, "turns": [{"question": text, "images": n}], "answers": [], "ids": ids})
    if ids.count(-200) != n:
        cases[-1]["text_image"] = bot.tokenizer("<image>", add_special_tokens=False).input_ids

def second_turn(name, first, answer, n_first, second, n_second):
    """HuatuoChatbot.chat's history ([text with its placeholders, answer]), then the next question's ids."""
    bot.history = [[bot.insert_image_placeholder(bot.input_moderation(first), n_first), answer]]
    t2 = bot.insert_image_placeholder(bot.input_moderation(second), n_second)
    cases.append({"name": name, "turns": [{"question": first, "images": n_first},
                                          {"question": second, "images": n_second}],
                  "answers": [answer], "ids": preprocess_list(bot.get_conv(t2))})


second_turn("second turn", "这张胸部X光片显示了什么？", "右下肺野可见片状高密度影，考虑肺炎。", 2, "病灶位于哪里？", 1)
# asked about the first turn's image (how qilin-lite chat continues a conversation)
second_turn("second turn, no new image", "What does the picture show?", "The CT scan shows a mass in the left lobe.", 1,
            "位于哪里？", 0)
# a history holding what moderation left spelt: moderated once, when it was typed (cli.py keeps the moderated text)
second_turn("nested end tags in the history", "<</s>s>这是什么？", "一张胸片。", 1, "<</s>s>还有呢？", 0)
json.dump({"source": "FreedomIntelligence/HuatuoGPT-Vision cli.py (HuatuoChatbot.input_moderation, "
           "insert_image_placeholder, get_conv(_without_history), preprocess_huatuo, tokenizer_image_token), "
           "transformers 4.40.2, tokenizers 0.19.1", "image_token_index": -200, "cases": cases},
          open(sys.argv[2], "w"), ensure_ascii=False, indent=1)
print(len(cases), "cases", file=sys.stderr)
