"""Answer-matching rules every benchmark shares: pure functions of text, no model, no files, no EvalItem.

In:  a reference answer (or caption) and a model's free-text answer.
Out: a verdict, an option letter or a number per answer; metrics.py applies these per item kind and sums them per
     run. OmniMedVQA's and MMMU's own rules (omnimedvqa.py, mmmu.py) take the place of the
     choice rule for their questions.

Text
- `normalize_text`: NFKC (full-width -> half-width), lower-case, punctuation and symbols -> space (a decimal point
  or thousands comma inside a number is kept / merged), whitespace collapsed.
- `normalize_answer`: `normalize_text`, then English articles dropped and number words -> digits, as LLaVA-Med's
  `normalize_word` does, so short VQA answers compare like theirs.
- `tokenize`: Chinese characters one token each, anything else by whitespace-separated words ("CT显示" -> ct 显 示).

Rules per item kind
- choice (PMC-VQA): `extract_option` finds the chosen letter in free text; correct when it equals the label. None
  (no option, or two different options) is wrong.
- closed (yes/no): two figures.
  * `closed_llavamed`: LLaVA-Med's rule (microsoft/LLaVA-Med llava/eval/run_eval.py): normalized prediction contains
    "yes" or "no" as a substring and contains the normalized reference as a substring. So "yes, no doubt" scores a
    hit for either reference, and "normal" contains "no". Chinese yes/no forms join "yes"/"no" in the first check.
    Two deliberate differences: every closed question counts in the denominator (run_eval.py appends nothing when the
    answer has yes/no but misses the reference, which inflates the figure; run_eval_batch.py fixed this), and the
    normalization is a re-implementation of `normalize_word` without its contraction table (it never changes a
    yes/no match).
  * `closed_strict`: the first yes/no word of the prediction (Chinese forms mapped to yes/no, question echoes like
    是否/有没有 skipped) equals the reference. A closed question whose reference is not yes/no ("left or right?")
    is a strict hit when the prediction's tokens begin with the reference's tokens.
- open: recall of reference tokens, sum_w min(ref_count[w], pred_count[w]) / len(ref tokens), tokens from
  `normalize_answer`. LLaVA-Med's recall counts the prediction's repeats ("left left" vs "left lung" gives 2/3
  there, 1/2 here); on ordinary short answers the two agree. For Chinese, LLaVA-Med splits on spaces (a whole
  phrase is one word); here each character is a token.
- caption: corpus BLEU-1..4 (clipped n-gram counts summed over the corpus, brevity penalty on total lengths, no
  smoothing, so a corpus with no matching 4-gram scores BLEU-4 = 0) and ROUGE-L F1 (LCS, beta = 1, as the
  `rouge-score` package; pycocoevalcap uses beta = 1.2) averaged over items. The per-item score is ROUGE-L.
"""

from __future__ import annotations

import math
import re
import unicodedata
from collections import Counter
from typing import Any, Sequence

LETTERS = "ABCDEFGH"

_ARTICLES = {"a", "an", "the"}
_NUMBER_WORDS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
    "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}
_CJK = "\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"
_TOKEN = re.compile(rf"[{_CJK}]|[^\s{_CJK}]+")

# Chinese yes/no forms. Longer forms are tried first at each position, so 不是 beats 是 and 没有 beats 有; the
# neutral forms are question echoes (是否, 有没有) or not an answer (无法 = "cannot"), skipped by the strict rule.
_YES_ZH = ("是的", "是", "有", "对的", "对")
_NO_ZH = ("不是", "否", "没有", "无", "不对")
_NEUTRAL_ZH = ("是否", "是不是", "有无", "有没有", "对不对", "无法", "所有")
_POLARITY = {**{f: "yes" for f in _YES_ZH}, **{f: "no" for f in _NO_ZH}, "yes": "yes", "no": "no"}
_YES_NO_RE = re.compile(
    "|".join(
        [r"(?<![a-z0-9])(?:yes|no)(?![a-z0-9])"]
        + [re.escape(f) for f in sorted(_YES_ZH + _NO_ZH + _NEUTRAL_ZH, key=len, reverse=True)]
    )
)


def as_text(prediction: Any) -> str:
    """A prediction as a string: None (a model that produced nothing) is "", anything else goes through str()."""
    if prediction is None:
        return ""
    return prediction if isinstance(prediction, str) else str(prediction)


ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.S)
REASONING_LAYOUT = re.compile(r"\s*<think>.+?</think>\s*<answer>.+?</answer>\s*", re.S)


def answer_part(text: Any) -> str:
    """The answer a reply gives: inside its last <answer>...</answer> where it has one (the layout Med-R1 and
    MedVLM-R1 train, `reinforce --reasoning`), else the whole reply. Scoring reads answers through it, so eval and
    reinforce's reward parse a reply the same way."""
    text = as_text(text)
    found = ANSWER_TAG.findall(text)
    return found[-1].strip() if found else text


def reasoning_layout(text: Any) -> bool:
    """Whether a reply is <think>...</think><answer>...</answer> and nothing else (the format reward)."""
    return REASONING_LAYOUT.fullmatch(as_text(text)) is not None


def normalize_text(text: Any) -> str:
    """Lower-case, full-width folded, punctuation -> space; "3.5" and "1,000" (-> "1000") survive as numbers."""
    s = unicodedata.normalize("NFKC", as_text(text)).lower()
    s = re.sub(r"(?<=\d),(?=\d{3}(?!\d))", "", s)
    out = []
    for i, ch in enumerate(s):
        if ch == "." and 0 < i < len(s) - 1 and s[i - 1].isdigit() and s[i + 1].isdigit():
            out.append(ch)
        elif unicodedata.category(ch)[0] in "PS":
            out.append(" ")
        else:
            out.append(ch)
    return " ".join("".join(out).split())


def normalize_answer(text: Any) -> str:
    """`normalize_text` plus LLaVA-Med's VQA clean-up: articles dropped, number words -> digits."""
    words = [_NUMBER_WORDS.get(w, w) for w in normalize_text(text).split()]
    return " ".join(w for w in words if w not in _ARTICLES)


def tokenize(text: Any, *, answer: bool = False) -> list[str]:
    """Chinese by character, other text by word, after `normalize_answer` (answer=True) or `normalize_text`."""
    return _TOKEN.findall(normalize_answer(text) if answer else normalize_text(text))


# ---------------------------------------------------------------- multiple choice


def extract_option(text: Any, choices: Sequence[str]) -> str | None:
    """The option letter a free-text answer chose, or None when it names none or names two different ones.

    Tried in order: an explicit answer cue ("答案是B", "答案：B", "正确答案为 C", "The answer is C"); a leading
    letter ("B", "B.", "(B)", "B: 肺炎"); the whole answer equal to one option's text ("肺炎"); a choice cue
    ("选B", "option C"); one stand-alone capital letter anywhere; the text of exactly one option inside the answer
    (an option whose text lies inside another found option's text does not count: "细菌性肺炎" picks that option,
    not "肺炎"). Letters are capitals only, so the English article "a" is never option A.
    """
    s = unicodedata.normalize("NFKC", as_text(text)).strip()
    letters = LETTERS[: max(len(choices), 1)]
    if not s:
        return None
    opt_texts = [normalize_text(strip_option_label(c)) for c in choices]

    def one(found: list[str]) -> str | None:
        distinct = set(found)
        return distinct.pop() if len(distinct) == 1 else None

    L = f"([{letters}])"  # one option letter, captured
    open_br = r"[\(（\[【]?\s*"
    strong = re.compile(
        r"(?:正确答案|答案|(?i:the\s+(?:correct\s+|right\s+|final\s+)?answer|answer))\s*"
        r"(?:(?i:is|should\s+be|would\s+be|will\s+be)|应该是|应该为|应为|应是|是|为|选)?\s*[:：]?\s*"
        rf"(?:(?i:option|choice)|选项)?\s*{open_br}{L}(?![A-Za-z])"
    )
    found = strong.findall(s)
    if found:
        return one(found)

    lead = re.match(rf"^{open_br}{L}\s*(?:[\)）\]】.:：、,，]|$)", s)
    if lead:
        return lead.group(1)
    lead = re.match(rf"^{L}\s+(\S.*)$", s, re.S)
    if lead:  # "B 肺炎" is option B; "A mass is seen" is the article, not A
        rest = lead.group(2)
        idx = letters.index(lead.group(1))
        if re.match(rf"[{_CJK}]", rest) or (opt_texts[idx] and normalize_text(rest).startswith(opt_texts[idx])):
            return lead.group(1)

    norm = normalize_text(s)
    exact = [letters[i] for i, t in enumerate(opt_texts) if t and t == norm]
    if exact:
        return one(exact)

    weak = re.compile(rf"(?:选择|选项|选|(?i:option|choice|choose))\s*{open_br}{L}(?![A-Za-z])")
    found = weak.findall(s)
    if found:
        return one(found)

    # Stand-alone capitals, minus the article in "A lesion is seen" (but "A or B", "A is correct" keep A).
    found = [
        m.group(1)
        for m in re.finditer(rf"(?<![A-Za-z]){L}(?![A-Za-z])", s)
        if not (m.group(1) == "A" and _ARTICLE_A.match(s, m.end()))
    ]
    if found:
        return one(found)

    # Whole tokens only, so option "y" is not found in "yes"; Chinese tokens are characters, so 肺炎 is in 显示肺炎.
    opt_tokens = [_TOKEN.findall(t) for t in opt_texts]
    said = _TOKEN.findall(norm)
    inside = [i for i, t in enumerate(opt_tokens) if t and _contains(said, t)]
    inside = [i for i in inside if not any(j != i and _contains(opt_tokens[j], opt_tokens[i]) for j in inside)]
    return one([letters[i] for i in inside])


def _contains(tokens: Sequence[str], part: Sequence[str]) -> bool:
    n = len(part)
    return any(list(tokens[i : i + n]) == list(part) for i in range(len(tokens) - n + 1))


_ARTICLE_A = re.compile(r"\s+(?!(?:or|and|is|was|seems|should|would|because|not|nor)\b)[a-z]")


def strip_option_label(choice: Any) -> str:
    """PMC-VQA writes choices as "A:Pneumonia"; the text is what follows the label."""
    return re.sub(r"^\s*[\(（]?[A-H]\s*[:：.、)）]\s*", "", as_text(choice))


# ---------------------------------------------------------------- closed (yes/no) questions


def yes_no(text: Any) -> str | None:
    """"yes" / "no" for the first yes/no word of an answer (是/有/对 -> yes, 否/不是/没有/无/不对 -> no), else None."""
    for m in _YES_NO_RE.finditer(normalize_answer(text)):
        polarity = _POLARITY.get(m.group(0))
        if polarity:
            return polarity
    return None


def reference_yes_no(reference: Any) -> str | None:
    """"yes"/"no" when the whole reference is a yes/no form ("是", "没有", "Yes."), else None ("left", "有两个")."""
    return _POLARITY.get(normalize_answer(reference))


def closed_llavamed(prediction: Any, reference: Any) -> bool:
    """LLaVA-Med's closed-question hit: the prediction mentions yes/no at all and contains the reference."""
    p, r = normalize_answer(prediction), normalize_answer(reference)
    mentions = "yes" in p or "no" in p or any(f in p for f in _YES_ZH + _NO_ZH)
    return bool(r) and mentions and r in p


def closed_strict(prediction: Any, reference: Any) -> bool:
    """The first yes/no word equals the reference; for a non-yes/no reference, the answer opens with it."""
    ref = reference_yes_no(reference)
    if ref is not None:
        return yes_no(prediction) == ref
    r, p = tokenize(reference, answer=True), tokenize(prediction, answer=True)
    return bool(r) and p[: len(r)] == r


# ---------------------------------------------------------------- open questions


def open_recall(prediction: Any, reference: Any) -> float:
    """Fraction of the reference's tokens (with multiplicity) found in the prediction."""
    ref = Counter(tokenize(reference, answer=True))
    if not ref:
        return 0.0
    pred = Counter(tokenize(prediction, answer=True))
    return sum(min(c, pred[w]) for w, c in ref.items()) / sum(ref.values())


# ---------------------------------------------------------------- captions


def _ngrams(tokens: Sequence[str], n: int) -> Counter:
    return Counter(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))


def corpus_bleu(
    hypotheses: Sequence[Sequence[str]], references: Sequence[Sequence[str]], max_n: int = 4
) -> list[float]:
    """[BLEU-1, ..., BLEU-max_n] over a corpus, one reference per hypothesis (Papineni et al. 2002)."""
    matches, totals = [0] * max_n, [0] * max_n
    for hyp, ref in zip(hypotheses, references, strict=True):
        for n in range(1, max_n + 1):
            h, r = _ngrams(hyp, n), _ngrams(ref, n)
            matches[n - 1] += sum(min(c, r[g]) for g, c in h.items())
            totals[n - 1] += sum(h.values())
    c = sum(len(h) for h in hypotheses)
    r = sum(len(x) for x in references)
    if c == 0:
        return [0.0] * max_n
    bp = 1.0 if c > r else math.exp(1 - r / c)
    out, log_sum = [], 0.0
    for n in range(1, max_n + 1):
        if matches[n - 1] == 0:
            out.extend([0.0] * (max_n - n + 1))  # log 0: this order and every higher one score 0
            break
        log_sum += math.log(matches[n - 1] / totals[n - 1])
        out.append(bp * math.exp(log_sum / n))
    return out


def rouge_l(hypothesis: Sequence[str], reference: Sequence[str], beta: float = 1.0) -> float:
    """ROUGE-L F-measure from the longest common subsequence of two token lists."""
    if not hypothesis or not reference:
        return 0.0
    prev = [0] * (len(reference) + 1)
    for h in hypothesis:
        cur = [0]
        for j, r in enumerate(reference):
            cur.append(prev[j] + 1 if h == r else max(prev[j + 1], cur[j]))
        prev = cur
    lcs = prev[-1]
    if lcs == 0:
        return 0.0
    p, r = lcs / len(hypothesis), lcs / len(reference)
    return (1 + beta**2) * p * r / (r + beta**2 * p)
