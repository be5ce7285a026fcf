"""Language-consistency reward: the share of the reasoning in the target language.

DeepSeek-R1 (section 2.3.2) rewards "the proportion of target language words
in the CoT". The rule here, decided by Unicode script alone:
- the CoT is `text.reasoning(completion)` (the `<think>` block);
- LaTeX control words (`\\frac`) and single Latin letters (variables `x`)
  are ignored; digits, punctuation and symbols never count;
- a *word* is a run of letters of one alphabetic script (Latin, Cyrillic,
  Greek, Arabic, Hebrew, Hangul, other letters), or a single Han ideograph or
  kana character: Chinese and Japanese are not written with spaces, so one
  character is the unit (a common approximation of a word for these scripts);
- reward = words in the scripts of the target language / all words, in [0, 1];
  a CoT with no word at all scores 0 (nothing to be consistent about is not
  rewarded, so an empty or all-symbol CoT cannot farm this reward).
Languages: en (Latin), zh (Han), ja (Han + kana), ko (Hangul), ru (Cyrillic),
from `example["language"]` (codes such as "zh-CN" or names such as "Chinese").
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Mapping
from typing import Any

from r1jax.rewards import text

_HAN = ("\u2e80-\u2fdf\u3005\u3007\u3021-\u3029\u3400-\u4dbf\u4e00-\u9fff"
        "\uf900-\ufaff\U00020000-\U0003134f")
_KANA = "\u3040-\u30ff\u31f0-\u31ff\uff66-\uff9f"
_HANGUL = "\u1100-\u11ff\u3130-\u318f\uac00-\ud7af"
_LATIN = ("A-Za-z\u00aa\u00ba\u00c0-\u00d6\u00d8-\u00f6\u00f8-\u024f\u1e00-\u1eff"
          "\uff21-\uff3a\uff41-\uff5a")
_CYRILLIC = "\u0400-\u052f"
_WORDS = re.compile(
    f"(?P<han>[{_HAN}])|(?P<kana>[{_KANA}])|(?P<hangul>[{_HANGUL}]+)"
    f"|(?P<latin>[{_LATIN}]+)|(?P<cyrillic>[{_CYRILLIC}]+)"
    f"|(?P<other>[^\\W\\d_{_HAN}{_KANA}{_HANGUL}{_LATIN}{_CYRILLIC}]+)")
_LATEX_COMMAND = re.compile(r"\\[A-Za-z]+")
LANGUAGE_SCRIPTS: dict[str, frozenset[str]] = {
    "en": frozenset({"latin"}), "zh": frozenset({"han"}),
    "ja": frozenset({"han", "kana"}), "ko": frozenset({"hangul"}),
    "ru": frozenset({"cyrillic"})}
_NAMES = {"english": "en", "chinese": "zh", "mandarin": "zh", "japanese": "ja",
          "korean": "ko", "russian": "ru"}


def language_code(language: str) -> str:
  """Normalises "zh-CN", "ZH", "Chinese" to a key of LANGUAGE_SCRIPTS."""
  key = language.strip().lower()
  key = _NAMES.get(key, key.replace("_", "-").split("-")[0])
  if key not in LANGUAGE_SCRIPTS:
    raise ValueError(f"unsupported language {language!r}; expected one of "
                     f"{sorted(LANGUAGE_SCRIPTS)} or {sorted(_NAMES)}")
  return key


def script_counts(cot: str) -> dict[str, int]:
  """Words per script in `cot` (see the module docstring for the rule)."""
  cot = _LATEX_COMMAND.sub(" ", unicodedata.normalize("NFKC", cot))
  counts: dict[str, int] = {}
  for m in _WORDS.finditer(cot):
    if m.lastgroup == "latin" and len(m.group()) == 1:
      continue  # a variable name, not a word
    counts[m.lastgroup] = counts.get(m.lastgroup, 0) + 1
  return counts


def language(completion: str, example: Mapping[str, Any]) -> float:
  """Share of the CoT's words written in `example["language"]`, in [0, 1]."""
  scripts = LANGUAGE_SCRIPTS[language_code(example["language"])]
  counts = script_counts(text.reasoning(completion))
  total = sum(counts.values())
  if total == 0:
    return 0.0
  return sum(n for s, n in counts.items() if s in scripts) / total
