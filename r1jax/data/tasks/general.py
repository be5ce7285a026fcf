"""A non-reasoning "general" slice: short requests answered at once, in English and Chinese.

R1's SFT mixes its reasoning samples with about 200K non-reasoning ones
(writing, factual QA, translation), and for simple queries gives no chain of
thought (R1 §2.3.3). The toy stand-in is a second task family that needs no
working out: name the first or the last word of a short list.

  Which word comes first: cat sun red?   ->  cat
  Which word comes last: cat sun red?    ->  red
  最后一个词是什么：猫 日 红？             ->  红

(Tried first and dropped: copying the list reversed, twice, or translated word
by word; the tiny model did not learn to copy 3-5 words from 2,048 documents,
pass@1 0 on held-out requests.)

Each example: {"question", "answer" (the words, space separated), "cot" (the
one-sentence non-reasoning, DIRECT of its language), "direct": True,
"language", "match": "exact", "kind" ("first" or "last"), "words"}.
The answer has letters, so it is matched as an exact string (whitespace
normalised), never by math-verify, which would read "cat sun" as a product of
symbols and call "sun cat" the same.
"""

from __future__ import annotations

import random

# The whole reasoning of an answer given at once, per language (also what the
# pre-training documents that skip the working write).
DIRECT = {"en": "I will answer directly.", "zh": "直接回答。"}

KINDS = ("first", "last")
_WORDS = {
    "en": ("cat", "dog", "sun", "red", "blue", "tree", "fish", "bird", "moon", "star", "rain",
           "book", "milk", "door", "hand", "ship"),
    "zh": tuple("猫狗日红蓝树鱼鸟月星雨书奶门手船"),
}
_ASK = {
    "en": {"first": "Which word comes first: {words}?",
           "last": "Which word comes last: {words}?"},
    "zh": {"first": "第一个词是什么：{words}？", "last": "最后一个词是什么：{words}？"},
}


def make_example(words: list[str], kind: str, language: str) -> dict:
  """The request `kind` on `words` in `language`, with its answer."""
  if kind not in KINDS:
    raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
  if language not in _ASK:
    raise ValueError(f"language must be one of {sorted(_ASK)}, got {language!r}")
  unknown = [w for w in words if w not in _WORDS[language]]
  if unknown:
    raise ValueError(f"words {unknown} are not in the {language} vocabulary {_WORDS[language]}")
  return {"question": _ASK[language][kind].format(words=" ".join(words)),
          "answer": words[0] if kind == "first" else words[-1], "cot": DIRECT[language],
          "direct": True, "language": language, "match": "exact", "kind": kind,
          "words": list(words)}


def sample(rng: random.Random, *, min_words: int = 3, max_words: int = 5,
           zh_fraction: float = 0.25) -> dict:
  """One request of `min_words`..`max_words` words (drawn with repetition)."""
  if not 2 <= min_words <= max_words <= 8:
    raise ValueError(f"need 2 <= min_words <= max_words <= 8, got {min_words}, {max_words}")
  if not 0.0 <= zh_fraction <= 1.0:
    raise ValueError(f"zh_fraction must be in [0, 1], got {zh_fraction}")
  language = "zh" if rng.random() < zh_fraction else "en"
  kind = rng.choice(KINDS)
  n = rng.randint(min_words, max_words)
  # Positions index the vocabulary, so one problem is the same in both languages.
  picks = [rng.randrange(len(_WORDS["en"])) for _ in range(n)]
  return make_example([_WORDS[language][i] for i in picks], kind, language)


def answers_at_once(reasoning: str) -> bool:
  """Whether a chain of thought is only the one sentence of an answer given at once."""
  return reasoning.strip() in DIRECT.values()


def problem_key(example: dict) -> str:
  """The request's identity: the same request in English or Chinese is one problem."""
  vocab = _WORDS[example["language"]]
  return f"general:{example['kind']}:{[vocab.index(w) for w in example['words']]}"
