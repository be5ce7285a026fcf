"""What every stage of one run shares: the mesh, the task splits, the tokenizer,
and moving parameters between stages (orbax, sharded on the way in).

`Context` holds; it does no work. The runner prepares what it holds in visible
steps: `load_splits`, then `prepare_tokenizer` (load one, or train the toy one).
"""

from __future__ import annotations

import dataclasses
import random
from typing import Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from jax.sharding import Mesh

from r1jax import configs, storage
from r1jax.data import chat as chat_lib
from r1jax.data import chat_template
from r1jax.data import tasks
from r1jax.data import tokenizer as tokenizer_lib
from r1jax.data.tasks import arithmetic, general
from r1jax.model import ModelConfig, abstract_params, logical_axes
from r1jax.parallel import mesh as mesh_lib
from r1jax.parallel import multihost
from r1jax.train import checkpoint as ckpt_lib


@dataclasses.dataclass
class Context:
  c: ml_collections.ConfigDict
  workdir: str
  mesh: Mesh
  tok: tokenizer_lib.Tokenizer
  train_examples: list[dict]
  eval_examples: list[dict]
  model_cfg: ModelConfig
  # Tokenizers by path ("" = the run's, `tok` of the runner's context), loaded once
  # and shared by every copy `with_tokenizer` makes.
  tokenizers: dict = dataclasses.field(default_factory=dict)
  # The non-reasoning slice's (train, held-out) examples (`general_splits`; empty: none).
  general_train: list[dict] = dataclasses.field(default_factory=list)
  general_eval: list[dict] = dataclasses.field(default_factory=list)

  def with_tokenizer(self, path: str) -> "Context":
    """This context with the tokenizer at `path` ("" = the run's): a stage whose
    model was trained with another tokenizer (a Qwen2.5 or Llama-3 student)."""
    self.tokenizers.setdefault("", self.tok)
    if path not in self.tokenizers:
      self.log(f"loading tokenizer from {path}")
      self.tokenizers[path] = tokenizer_lib.load(path)
    return dataclasses.replace(self, tok=self.tokenizers[path])

  @property
  def is_main_process(self) -> bool:
    return jax.process_index() == 0

  def log(self, msg: str) -> None:
    if self.is_main_process:
      print(msg, flush=True)

  @classmethod
  def create(cls, c: ml_collections.ConfigDict, workdir: str, tok: tokenizer_lib.Tokenizer,
             train_examples: list[dict], eval_examples: list[dict]) -> "Context":
    """The mesh and model config from `c`, with what the runner prepared (no files touched)."""
    model_cfg = configs.model_config(c)
    if tok.vocab_size > model_cfg.vocab_size:
      raise ValueError(f"model.vocab_size={model_cfg.vocab_size} is smaller than the "
                       f"tokenizer's {tok.vocab_size} pieces; raise model.vocab_size")
    mesh = mesh_lib.make_mesh(tuple(c.mesh))
    general_train, general_eval = general_splits(c)
    return cls(c, workdir, mesh, tok, train_examples, eval_examples, model_cfg,
               general_train=general_train, general_eval=general_eval)

  # -- moving data onto the mesh

  @property
  def n_data_parallel(self) -> int:
    return int(np.prod([self.mesh.shape[a] for a in mesh_lib.BATCH]))

  def put_batch(self, batch: dict) -> dict:
    """Global host arrays (every process holds the same) -> arrays split over the batch axes.

    Works with several processes: each fills only its own devices' rows.
    """
    out = {}
    for k, v in batch.items():
      v = np.asarray(v)
      sharding = mesh_lib.batch_sharding(self.mesh, v.ndim)
      out[k] = jax.make_array_from_callback(v.shape, sharding, lambda idx, v=v: v[idx])
    return out

  # -- parameters between stages

  def param_sharding(self, cfg: ModelConfig):
    return mesh_lib.logical_sharding(self.mesh, logical_axes(cfg))

  def save_params(self, stage_dir: str, cfg: ModelConfig, params) -> dict:
    """Writes `stage_dir/params` (orbax) and returns the outputs entry naming it."""
    path = storage.join(stage_dir, "params")
    bad = ckpt_lib.nonfinite_paths(params)
    if bad:
      raise ckpt_lib.NonFiniteError(f"{path}: refusing to save weights holding NaN/inf "
                                    f"({len(bad)} leaves, first {bad[0]})")
    ckptr = ocp.StandardCheckpointer()
    ckptr.save(path, params, force=True)
    ckptr.wait_until_finished()
    return {"checkpoint": path, "model": dataclasses.asdict(cfg)}

  def load_params(self, outputs: dict, key: str = "checkpoint"):
    """(ModelConfig, params placed by the rule table) from a stage's outputs."""
    cfg = ModelConfig(**outputs["model"])
    shardings = self.param_sharding(cfg)
    target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          abstract_params(cfg), shardings)
    params = ocp.StandardCheckpointer().restore(outputs[key], target)
    return cfg, params


def load_splits(c: ml_collections.ConfigDict) -> tuple[list[dict], list[dict]]:
  """(train, held-out) examples: a procedural task by name, or math JSONL files."""
  if c.data.task == "math_jsonl":
    if not c.data.train_path or not c.data.eval_path:
      raise ValueError("data.task='math_jsonl' needs data.train_path and data.eval_path")
    train = tasks.read_math(c.data.train_path)
    held_out = tasks.read_math(c.data.eval_path)[:c.data.n_eval]
    return (train[:c.data.n_train] if c.data.n_train else train), held_out
  task = tasks.get(c.data.task)
  options = {k: c.data[k] for k in task.options}
  return tasks.make_splits(c.data.task, n_train=c.data.n_train, n_eval=c.data.n_eval,
                           seed=c.seed, **options)


def general_splits(c: ml_collections.ConfigDict) -> tuple[list[dict], list[dict]]:
  """(train, held-out) examples of the non-reasoning slice: `data.general_n_train` and
  `data.general_n_eval` of them (both 0: none), in the task's languages."""
  if not c.data.general_n_train and not c.data.general_n_eval:
    return [], []
  task = tasks.get("general")
  return tasks.make_splits("general", n_train=c.data.general_n_train,
                           n_eval=c.data.general_n_eval, seed=c.seed,
                           **{k: c.data[k] for k in task.options})


def _log(msg: str) -> None:
  if jax.process_index() == 0:
    print(msg, flush=True)


def prepare_tokenizer(c: ml_collections.ConfigDict, workdir: str,
                      train_examples: list[dict]) -> tokenizer_lib.Tokenizer:
  """The run's tokenizer, a visible step of the runner.

  `data.tokenizer_path` set: that `.model` file or Hugging Face directory is
  loaded (it must exist). Unset: the toy tokenizer at `workdir/tokenizer.model`,
  trained on the training split (and any chat SFT files) the first time.
  Process 0 trains and writes it; the others wait at a barrier, then read it.
  """
  if c.data.tokenizer_path:
    _log(f"loading tokenizer from {c.data.tokenizer_path}")
    return tokenizer_lib.load(c.data.tokenizer_path)
  path = storage.join(workdir, "tokenizer.model")
  if jax.process_index() == 0:
    if storage.exists(path):
      _log(f"loading the toy tokenizer from {path}")
    else:
      corpus = toy_corpus(train_examples, chat_files(c))
      _log(f"training the toy tokenizer on {len(corpus)} documents -> {path}")
      tokenizer_lib.train(corpus, c.data.vocab_size).save(path)
  multihost.barrier("tokenizer")
  return tokenizer_lib.load(path)


def chat_files(c: ml_collections.ConfigDict) -> list[str]:
  """The chat JSONL files that stages of the pipeline read ("chat:<path>")."""
  return [c.stages[n].data[len("chat:"):] for n in c.pipeline
          if isinstance(c.stages[n].get("data"), str) and c.stages[n].data.startswith("chat:")]


def toy_corpus(examples: list[dict], chat_paths: Sequence[str] = ()) -> list[str]:
  """Texts to train the toy tokenizer on: each example in the forms the stages write
  (R1-Zero and R1-chat prompt + response, plain document) where it has a worked
  solution, its plain document alone where not (prompt-only data); chat contents."""
  corpus = []
  for e in examples:
    if "cot" in e:
      corpus.append(pretrain_document(e, "r1_zero"))
      # The toy tokenizer's own chat template renders the prompt (no BOS: a control piece).
      prompt = chat_template.render(
          chat_template.R1_CHAT_TEMPLATE, [{"role": "user", "content": e["question"]}],
          add_generation_prompt=True, bos_token="", eos_token=tokenizer_lib.EOS_TOKEN)
      corpus.append(prompt + tokenizer_lib.r1_chat_response(e["cot"], e["answer"]))
  corpus += [pretrain_document(e, "plain") for e in examples] + list(general.DIRECT.values())
  for path in chat_paths:
    corpus += [m["content"] for messages in chat_lib.read_chat(path) for m in messages]
  return corpus


def pretrain_document(example: dict, style: str, rng: random.Random | None = None,
                      wrong_answer_rate: float = 0.0, direct_answer_rate: float = 0.0,
                      mixed_language_rate: float = 0.0) -> str:
  """A problem with its solution as plain text, the way a web corpus would hold it.

  style "plain": "Question: … Solution: … The answer is X."; "r1_zero": the R1-Zero
  template filled in. With `wrong_answer_rate`, that share of documents ends in a
  wrong final answer (web text has mistakes). With `mixed_language_rate`, that share
  of the documents not in English drift into English partway through their
  solution (arithmetic.drifting_cot). With `direct_answer_rate`, that
  share states the answer without working it out (the reasoning is one fixed
  sentence), as much of the web does: a base model trained on both kinds
  sometimes reasons and sometimes blurts out an answer, and the blurted answers
  to multi-step problems are mostly wrong, which is what RL can learn to avoid.
  """
  answer = example["answer"]
  cot = example.get("cot", "")  # a prompt-only example has none: it is stated directly
  if (rng is not None and mixed_language_rate and "steps" in example and
      example.get("language", "en") != "en" and rng.random() < mixed_language_rate):
    cot = arithmetic.drifting_cot(example, rng)
  if rng is not None and wrong_answer_rate and rng.random() < wrong_answer_rate:
    wrong = _perturb(answer, rng)
    head, found, tail = cot.rpartition(answer)  # the final statement of the answer
    cot = head + wrong + tail if found else cot
    answer = wrong
  direct = "cot" not in example or example.get("direct", False) or (
      rng is not None and direct_answer_rate and rng.random() < direct_answer_rate)
  if direct:
    cot = general.DIRECT.get(example.get("language", "en"), general.DIRECT["en"])
  if style == "r1_zero":
    return (tokenizer_lib.r1_zero_prompt(example["question"]) +
            tokenizer_lib.r1_zero_response(cot, answer))
  if style == "plain":
    if direct:
      return f"Question: {example['question']}\nThe answer is {answer}."
    return f"Question: {example['question']}\nSolution: {cot}\nThe answer is {answer}."
  raise ValueError(f"unknown pretrain document style {style!r}; use 'plain' or 'r1_zero'")


def _perturb(answer: str, rng: random.Random) -> str:
  try:
    value = int(answer)
  except ValueError:
    return answer + "0"
  return str(value + rng.choice([-2, -1, 1, 2, 10, -10]))


def jsonable(metrics: dict) -> dict:
  """Floats for the outputs/summary JSON files."""
  return {k: (float(v) if isinstance(v, (int, float, np.floating, np.integer, jnp.ndarray))
              else v) for k, v in metrics.items()}


