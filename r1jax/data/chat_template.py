"""Jinja chat templates, rendered the way Hugging Face transformers renders them.

A tokenizer directory's `chat_template` is a Jinja program over `messages`
(a list of {"role", "content"}), `add_generation_prompt` and the special
tokens (`bos_token`, `eos_token`, ...). transformers compiles it in a
sandboxed, immutable environment with `trim_blocks` and `lstrip_blocks`,
the `loopcontrols` extension, the `{% generation %}` tag, a
`raise_exception(msg)` global, a `strftime_now(fmt)` global and a `tojson`
filter that keeps non-ASCII text and takes json.dumps' options; we do the
same (checked against transformers 5.24), so a template written for
transformers renders the same string here.

`R1_CHAT_TEMPLATE` is R1's conversation shape, used by the toy sentencepiece
tokenizer and by the test fixture tokenizer:

  BOS [system] <｜User｜>question<｜Assistant｜>answer EOS <｜User｜>… <｜Assistant｜><think>\\n
"""

from __future__ import annotations

import datetime
import functools
import json
from typing import Any, Sequence

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.sandbox

# The generation prompt opens the reasoning, as DeepSeek-R1's own template does.
R1_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}"
    "{% if not loop.first %}{{ raise_exception('a system message must come first') }}{% endif %}"
    "{{ message['content'] }}"
    "{% elif message['role'] == 'user' %}"
    "{{ '<｜User｜>' + message['content'] }}"
    "{% elif message['role'] == 'assistant' %}"
    "{{ '<｜Assistant｜>' + message['content'] + eos_token }}"
    "{% else %}"
    "{{ raise_exception('unknown role ' + message['role'] + '; use system, user or assistant') }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<｜Assistant｜><think>\\n' }}{% endif %}")


class ChatTemplateError(ValueError):
  """A template that does not compile, or one that refused the messages."""


def _raise(message: str):
  raise jinja2.exceptions.TemplateError(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | str | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
  # Jinja's own tojson escapes <, >, & and ' for HTML; chat prompts want the text.
  return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                    sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
  return datetime.datetime.now().strftime(fmt)


class _Generation(jinja2.ext.Extension):
  """`{% generation %}…{% endgeneration %}`: transformers uses it to mark assistant
  text for masks; here it renders its body unchanged (r1jax.data.chat finds the
  assistant text itself), so templates that use it still compile."""

  tags = {"generation"}

  def parse(self, parser):
    lineno = next(parser.stream).lineno
    body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
    return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

  def _body(self, caller) -> str:
    return caller()


@functools.lru_cache(maxsize=16)
def _compile(source: str) -> jinja2.Template:
  env = jinja2.sandbox.ImmutableSandboxedEnvironment(
      trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols, _Generation])
  env.filters["tojson"] = _tojson
  env.globals["raise_exception"] = _raise
  env.globals["strftime_now"] = _strftime_now
  try:
    return env.from_string(source)
  except jinja2.exceptions.TemplateSyntaxError as e:
    raise ChatTemplateError(f"the chat template does not compile: {e} (line {e.lineno})") from None


def render(source: str, messages: Sequence[dict], *, add_generation_prompt: bool,
           **variables: Any) -> str:
  """The template `source` filled in with `messages` and `variables` (special tokens)."""
  template = _compile(source)
  try:
    # transformers passes tools and documents even when there are none.
    return template.render(**{"tools": None, "documents": None, **variables},
                           messages=list(messages), add_generation_prompt=add_generation_prompt)
  except jinja2.exceptions.TemplateError as e:
    raise ChatTemplateError(f"the chat template refused the messages: {e}") from None
