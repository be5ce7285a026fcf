"""Typed config helpers shared by experiment files.

Experiment files return an `ml_collections.ConfigDict` built from `base()`: every
key is declared here with its default, so an experiment that sets an unknown
key fails at load time (the dict is locked). Modules never see the ConfigDict:
`model_config`, `optim_config` turn its sections into frozen dataclasses.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import types

import ml_collections
import numpy as np

from r1jax.model import ModelConfig
from r1jax.train.optim import OptimConfig

MODEL_PRESETS = {
    "tiny": ModelConfig.tiny,
    "deepseek_v3_671b": ModelConfig.deepseek_v3_671b,
    # Dense GQA students (R1 distils into Qwen2.5 and Llama-3 bases).
    "tiny_gqa": ModelConfig.tiny_gqa,
    "qwen2_5_1_5b": ModelConfig.qwen2_5_1_5b,
    "qwen2_5_7b": ModelConfig.qwen2_5_7b,
    "llama3_1_8b": ModelConfig.llama3_1_8b,
}


def _fields(dc) -> dict:
  return {f.name: getattr(dc, f.name) for f in dataclasses.fields(dc)}


def base() -> ml_collections.ConfigDict:
  """Every top-level key an experiment may set. Stages are added with the
  `*_stage` templates below, listed in `pipeline`, then the dict is locked."""
  c = ml_collections.ConfigDict()
  c.seed = 0
  # model: a preset plus field overrides (any ModelConfig field).
  c.model_preset = "tiny"
  c.model = ml_collections.ConfigDict(_fields(ModelConfig.tiny()))
  c.mesh = (-1, 1, 1, 1)  # (data, fsdp, expert, tensor); -1 takes the remaining devices
  # data: `task` names an entry of r1jax.data.tasks.TASKS, which reads its own options here
  # (arithmetic: min/max_steps, max_operand, ops; countdown: min/max_numbers, max_value, max_target,
  # max_misses; both: zh_fraction).
  # tokenizer_path: a sentencepiece .model file or a Hugging Face tokenizer directory
  # (tokenizer.json + tokenizer_config.json, with its chat template); required when a
  # stage starts from "hf:<dir>". "" = the toy tokenizer, trained on the training
  # split (vocab_size pieces) and kept as workdir/tokenizer.model.
  c.data = ml_collections.ConfigDict(dict(
      task="arithmetic", n_train=4096, n_eval=256, min_steps=1, max_steps=3, zh_fraction=0.25,
      max_operand=20, ops="+-*",
      min_numbers=3, max_numbers=4, max_value=50, max_target=100, max_misses=2,
      # The non-reasoning "general" slice (r1jax.data.tasks.general; 0 = none): requests
      # answered at once, drawn beside the task and split the same way, for the stages
      # that mix it in (sft general_rows, grpo general_prompts) and eval benchmarks on
      # "task:general". The toy tokenizer does not read them (it spells their words
      # in smaller pieces), so the base model is the one the task alone gives.
      general_n_train=0, general_n_eval=0, min_words=3, max_words=5,
      vocab_size=512, tokenizer_path="",
      # task "math_jsonl": real {"question", "answer"} files instead of a generator.
      train_path="", eval_path=""))
  c.pipeline = ()
  c.stages = ml_collections.ConfigDict()
  return c


def _train_keys(**kw) -> dict:
  keys = dict(steps=100, batch_size=32, seq_len=160, log_every=10, checkpoint_every=50,
              # Each batch as this many chunks, gradients summed, one update (memory, not maths).
              micro_batches=1,
              optim=ml_collections.ConfigDict(_fields(OptimConfig())),
              # Held-out accuracy after training (0 prompts = skip), sampled in eval_template.
              eval_prompts=0, eval_samples=1, eval_temperature=0.6, eval_top_p=0.95,
              eval_top_k=0, eval_template="r1_zero", eval_max_prompt_len=112,
              eval_max_new_tokens=64)
  return _apply(keys, kw)


def _stage_keys(kind: str, **keys) -> dict:
  """Keys every stage has, then the kind's own. tokenizer_path: the tokenizer of the
  model this stage trains or samples ('' = its init stage's, else data.tokenizer_path),
  for a student whose tokenizer is not the run's (a Qwen2.5 or Llama-3 base)."""
  return dict(kind=kind, tokenizer_path="", **keys)


# Stage keys that hold ModelConfig fields over the experiment's `model` ({} = that model).
MODEL_KEYS = ("model", "student")


def _apply(keys: dict, overrides: dict) -> dict:
  unknown = set(overrides) - set(keys)
  if unknown:
    raise ValueError(f"unknown stage keys {sorted(unknown)}; declared: {sorted(keys)}")
  for k, v in overrides.items():
    if isinstance(keys[k], ml_collections.ConfigDict) and isinstance(v, dict):
      allowed = _fields(ModelConfig.tiny()) if k in MODEL_KEYS else keys[k]
      bad = set(v) - set(allowed.keys())
      if bad:
        raise ValueError(f"unknown {k} keys {sorted(bad)}")
      keys[k].update(v)
    else:
      keys[k] = v
  return keys


def pretrain_stage(**kw) -> ml_collections.ConfigDict:
  """LM training of the toy base model on problems with worked solutions (all tokens).

  r1_zero_fraction of the documents are written in the R1-Zero template (a base
  model has seen such formats); wrong_answer_rate of them end in a wrong answer;
  direct_answer_rate of the template documents give the answer without the worked
  steps (the plain ones always work them out), so the base model knows how to
  reason but, in the R1-Zero template, often answers at once. mixed_language_rate
  of the non-English documents drift into English partway through their solution
  (arithmetic task only), so the base model mixes languages as R1-Zero did.
  """
  keys = _stage_keys("pretrain", init="", model=ml_collections.ConfigDict(),
              r1_zero_fraction=0.3, wrong_answer_rate=0.0, direct_answer_rate=0.0,
              mixed_language_rate=0.0)
  keys.update(_train_keys())
  return ml_collections.ConfigDict(_apply(keys, kw))


def sft_stage(**kw) -> ml_collections.ConfigDict:
  """SFT with the loss on the response only. data: "task" (worked solutions of the
  training split in `template`), "stage:<name>" (a rejection_sample dataset, plus
  `extra_task_rows` worked solutions) or
  "chat:<path>" (a chat JSONL file, one {"messages": [{"role", "content"}, ...]}
  per line, optional system message first, multi-turn; rendered with the
  tokenizer's chat template, loss on the assistant's content and end-of-turn
  token only; the file's last tenth is held out for the loss; see r1jax.data.chat).
  `template` and `extra_task_rows` do not apply to chat data. general_rows: how many
  of the general slice's training requests join the data, answered without reasoning
  (R1 §2.3.3's non-reasoning SFT data).

  model (in pretrain and sft): ModelConfig fields over the experiment's `model`, for a
  stage that trains another architecture (a distillation student's own pretraining);
  {} = the experiment's model. With init="hf:<dir>" they declare the checkpoint's
  architecture for the plan tool; with init="stage:<name>" the model is that stage's."""
  keys = _stage_keys("sft", init="", model=ml_collections.ConfigDict(), data="task",
              template="r1_zero", extra_task_rows=0, general_rows=0)
  keys.update(_train_keys())
  return ml_collections.ConfigDict(_apply(keys, kw))


def _sampling_keys() -> dict:
  return dict(template="r1_zero", prompts=256, samples_per_prompt=4, keep_per_prompt=1,
              temperature=1.0, top_p=1.0, top_k=0, max_prompt_len=112, max_new_tokens=64,
              batch_rows=128, min_language=0.95,
              # Share of repeated word trigrams allowed: worked sums repeat "+ 5 =" a
              # few times (0 dropped 920 of 8,192 good distill traces); loops score > 0.5.
              max_repetition=0.2,
              # R1 §2.3.3 also drops reasoning with long paragraphs or code blocks;
              # 0 / False = off (the R1 experiment turns both on).
              max_paragraph_chars=0, reject_code_blocks=False)


def rejection_sample_stage(**kw) -> ml_collections.ConfigDict:
  """Samples k completions per training prompt and keeps correct, well-formed,
  single-language, non-repetitive ones (R1 §2.3.3) as an SFT dataset."""
  keys = _stage_keys("rejection_sample", init="")
  keys.update(_sampling_keys())
  return ml_collections.ConfigDict(_apply(keys, kw))


def distill_stage(**kw) -> ml_collections.ConfigDict:
  """A teacher generates traces (kept as in rejection sampling); a student is trained
  on them by SFT alone (R1 §2.4).

  The student is `init`'s weights: "stage:<name>" (a pretrained student, e.g. a
  pretrain stage with its own `model`) or "hf:<dir>" (a Qwen2.5 / Llama-3 base, as
  R1 distils into), or "" for a fresh one. `student` holds ModelConfig fields over
  the experiment's `model`: the fresh student's architecture, or with "hf:" the
  checkpoint's (for the plan tool); it stays {} when init is a stage."""
  keys = _stage_keys("distill", teacher="", init="", extra_task_rows=0,
              student=ml_collections.ConfigDict())
  keys.update(_sampling_keys())
  keys.update(_train_keys())
  return ml_collections.ConfigDict(_apply(keys, kw))


def grpo_stage(**kw) -> ml_collections.ConfigDict:
  """GRPO from `init` with weighted rule-based rewards; held-out accuracy is
  measured before and after on `eval_prompts` prompts with `eval_*` sampling
  settings (0 = no in-stage evaluation), and every `eval_every` steps in between
  (0 = never), logged as eval/accuracy (pass@1) and eval/cons@<eval_samples>: the
  paper's R1-Zero curve of majority voting against pass@1 over training.
  general_prompts: how many of the general slice's training requests join the
  prompts (R1 §2.3.4's mix of reasoning and general data; reward them with
  "preference")."""
  from r1jax.rl.step import GRPOConfig  # the RL layer is only needed by RL stages
  keys = _stage_keys("grpo", init="", template="r1_zero",
              rewards=(("accuracy", 1.0), ("format", 0.5)), reward_timeout_s=10.0,
              reward_workers=2, grpo=ml_collections.ConfigDict(_fields(GRPOConfig())),
              steps=50, log_every=1, checkpoint_every=10,
              optim=ml_collections.ConfigDict(_fields(OptimConfig())),
              eval_prompts=128, eval_samples=2, eval_every=0, eval_temperature=0.6,
              eval_top_p=0.95,
              eval_top_k=0, general_prompts=0)
  return ml_collections.ConfigDict(_apply(keys, kw))


def eval_stage(**kw) -> ml_collections.ConfigDict:
  """Evaluates `init`'s weights ("stage:<name>" or "hf:<dir>") on `benchmarks`:
  `samples` (k) completions per prompt, pass@1, cons@k, pass@k for each k of
  `pass_ks` up to k, format, truncation, language-consistency and mixing rates
  (r1jax/eval).

  benchmarks: ((name, source[, layout]), ...); source "task:held_out" is the run's
  held-out split, "task:general" the general slice's held-out requests, anything
  else a math JSONL file whose layout ("auto", "math500", "aime", "gsm8k") says
  where its gold answer is. max_prompts caps each benchmark
  (0 = all). The sampling defaults are R1's evaluation settings (T 0.6, top-p 0.95,
  the R1 chat template); batch_rows caps the sampler's batch."""
  keys = _stage_keys("eval", init="", benchmarks=(("held_out", "task:held_out"),),
              max_prompts=0, samples=8, temperature=0.6, top_p=0.95, top_k=0,
              template="r1_chat", max_prompt_len=112, max_new_tokens=64, batch_rows=256,
              pass_ks=(1, 2, 4, 8, 16, 32, 64))
  return ml_collections.ConfigDict(_apply(keys, kw))


def mesh_devices(c: ml_collections.ConfigDict) -> int | None:
  """The device count a mesh with no -1 entry asks for (pod configs); None otherwise."""
  return None if -1 in tuple(c.mesh) else int(np.prod(tuple(c.mesh)))


def n_data_parallel(c: ml_collections.ConfigDict, n_devices: int | None = None) -> int:
  import jax  # noqa: PLC0415 - only the device count is needed

  from r1jax.parallel import mesh as mesh_lib
  shape = mesh_lib.mesh_shape(tuple(c.mesh), n_devices or jax.device_count())
  return shape[0] * shape[1] * shape[2]


def check_stage(c: ml_collections.ConfigDict, name: str, n_devices: int | None = None) -> None:
  """Builds a stage's typed configs so their own checks run; raises ValueError."""
  sc = c.stages[name]
  n_dp = n_data_parallel(c, n_devices)
  if "optim" in sc:
    OptimConfig(**sc.optim.to_dict())
  if "batch_size" in sc and sc.kind != "grpo" and sc.batch_size % n_dp:
    raise ValueError(f"batch_size={sc.batch_size} is not a multiple of the {n_dp} "
                     "data-parallel devices")
  if "micro_batches" in sc:
    from r1jax.train.sft import check_micro_batches
    check_micro_batches(sc.batch_size, sc.micro_batches, n_dp)
  init = sc.get("init", "")
  from_stage = isinstance(init, str) and init.startswith("stage:")
  key = _model_key(sc)
  if key:
    if sc[key] and from_stage:
      raise ValueError(f"{key}: leave it {{}} when init={init!r}; the model is that stage's")
    model_config(c, sc[key])
  if sc.get("tokenizer_path") and from_stage:
    ref = _stage_ref(c, init)
    inherited = stage_tokenizer(c, ref) if ref else ""
    if sc.tokenizer_path != inherited:
      raise ValueError(f"tokenizer_path={sc.tokenizer_path!r}, but init={init!r} was trained "
                       f"with {inherited or 'the run tokenizer'!r}; a model's token ids mean "
                       "one tokenizer's pieces")
  for key in ("r1_zero_fraction", "wrong_answer_rate", "direct_answer_rate",
              "mixed_language_rate"):
    if key in sc and not 0.0 <= sc[key] <= 1.0:
      raise ValueError(f"{key}={sc[key]} is not a fraction in [0, 1]")
  for key in ("general_rows", "general_prompts"):
    if sc.get(key, 0) and not 0 <= sc[key] <= c.data.general_n_train:
      n = c.data.general_n_train
      raise ValueError(f"{key}={sc[key]}: the general slice has data.general_n_train={n} "
                       f"training requests; use 0..{n}")
  if sc.get("mixed_language_rate") and c.data.task != "arithmetic":
    raise ValueError(f"mixed_language_rate={sc.mixed_language_rate}: only the arithmetic "
                     f"task's worked solutions can drift between languages, and "
                     f"data.task={c.data.task!r}")
  if sc.kind == "grpo":
    from r1jax.rewards import RewardSpec
    from r1jax.rl.step import GRPOConfig
    g = GRPOConfig(**sc.grpo.to_dict())
    RewardSpec.create([tuple(t) for t in sc.rewards]).check_available()
    g.check_data_parallel(n_dp, key_prefix="grpo.")
    # `steps` counts rollouts, the schedule counts updates (GRPOConfig's docstring).
    if sc.optim.total_steps != sc.steps * g.updates_per_step:
      raise ValueError(
          f"optim.total_steps={sc.optim.total_steps} must equal steps × updates per rollout "
          f"= {sc.steps} × {g.updates_per_step} (grpo.n_minibatches × grpo.num_iterations) = "
          f"{sc.steps * g.updates_per_step}: steps counts rollouts, optim.total_steps updates")
  from r1jax.rl.rollout import SamplingConfig  # raises on a bad temperature / top-p / top-k
  if "eval_top_p" in sc:
    SamplingConfig(sc.eval_temperature, sc.eval_top_p, sc.eval_top_k)
  if sc.kind == "eval":
    from r1jax.eval import benchmarks
    benchmarks.require_general(benchmarks.parse(sc.benchmarks), c.data.general_n_eval)
    SamplingConfig(sc.temperature, sc.top_p, sc.top_k)
    if not sc.init:
      raise ValueError("init='': an eval stage needs weights ('stage:<name>' or 'hf:<dir>')")
    if sc.samples < 1 or sc.max_prompts < 0:
      raise ValueError(f"samples={sc.samples} must be >= 1 and max_prompts={sc.max_prompts} "
                       ">= 0 (0 = all)")
  if "batch_rows" in sc and sc.batch_rows % n_dp:
    raise ValueError(f"batch_rows={sc.batch_rows} is not a multiple of the {n_dp} "
                     "data-parallel devices")
  for field in ("init", "teacher", "data"):
    if field not in sc:
      continue
    v = sc[field]
    if field == "data":
      if v != "task" and not v.startswith(("stage:", "chat:")):
        raise ValueError(f"data={v!r}: use 'task', 'stage:<earlier stage>' or "
                         "'chat:<chat JSONL file>'")
    elif isinstance(v, str) and v and not v.startswith(("stage:", "hf:")):
      raise ValueError(f"{field}={v!r}: use '' (fresh), 'stage:<earlier stage>' or 'hf:<dir>'")


EXPERIMENTS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                               "experiments")


def experiment(path: str) -> types.ModuleType:
  """Imports an experiment file: `path` as given if it exists, else relative to
  experiments/ (so one experiment can build on another's config)."""
  if not os.path.exists(path):
    path = os.path.join(EXPERIMENTS_DIR, path)
  if not os.path.exists(path):
    raise ValueError(f"no experiment file {path}")
  name = os.path.relpath(path, EXPERIMENTS_DIR).replace(os.sep, "_").replace(".", "_")
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def split_variant(arg: str | None, variants: tuple[str, ...]) -> tuple[str, bool]:
  """An ablation file's argument, "<variant>[,smoke]" (either part optional).

  Returns (variant, smoke); the variant defaults to the first of `variants`."""
  parts = [p for p in (arg or "").split(",") if p]
  rest = [p for p in parts if p != "smoke"]
  if len(rest) > 1 or (rest and rest[0] not in variants):
    raise ValueError(f"config argument {arg!r}: expected one of {list(variants)}, "
                     "optionally followed by ',smoke'")
  return (rest[0] if rest else variants[0]), "smoke" in parts


def ablation(arg: str | None, variants: tuple[str, ...], apply,
             base: str = "r1_zero/tiny.py") -> ml_collections.ConfigDict:
  """The config of one ablation arm: `base`'s, changed by `apply(c, variant)`.

  `arg` is "<variant>[,smoke]"; smoke shrinks the run the way the tiny
  experiments' `shrink` does (after the variant is applied)."""
  variant, smoke = split_variant(arg, variants)
  c = experiment(base).get_config()
  with c.unlocked():
    apply(c, variant)
    if smoke:
      experiment("r1_zero/tiny.py").shrink(c)
  c.lock()
  return c


def with_model_preset(c: ml_collections.ConfigDict, preset: str, **overrides) -> None:
  """Replaces c.model by a preset's fields (then `overrides`)."""
  fields = model_fields(preset, **overrides)
  c.model_preset = preset
  for k, v in fields.items():
    c.model[k] = v


def model_fields(preset: str, **overrides) -> dict:
  """A preset's ModelConfig fields, then `overrides` (an all-dense preset stays all
  dense when n_layers changes): for c.model, or a stage's `model` / `student`."""
  if preset not in MODEL_PRESETS:
    raise ValueError(f"unknown model preset {preset!r}; known: {sorted(MODEL_PRESETS)}")
  fields = _fields(MODEL_PRESETS[preset]())
  unknown = set(overrides) - set(fields)
  if unknown:
    raise ValueError(f"unknown ModelConfig fields {sorted(unknown)}")
  if ("n_layers" in overrides and "n_dense_layers" not in overrides
      and fields["n_dense_layers"] == fields["n_layers"]):
    overrides = {**overrides, "n_dense_layers": overrides["n_layers"]}
  return {**fields, **overrides}


def model_config(c: ml_collections.ConfigDict, overrides=None) -> ModelConfig:
  """The experiment's model, with a stage's `model` / `student` fields over it."""
  fields = c.model.to_dict()
  if overrides:
    fields.update(overrides.to_dict() if hasattr(overrides, "to_dict") else overrides)
  return ModelConfig(**fields)


def _stage_ref(c: ml_collections.ConfigDict, value) -> str | None:
  """The stage of `c` that a field's "stage:<name>" names, else None."""
  if isinstance(value, str) and value.startswith("stage:") and value[6:] in c.stages:
    return value[6:]
  return None


def _model_key(sc) -> str | None:
  return "student" if sc.get("kind") == "distill" else ("model" if "model" in sc else None)


def stage_model(c: ml_collections.ConfigDict, name: str) -> ModelConfig:
  """The architecture stage `name` trains, samples or evaluates (the distill stage's
  student): its `init` stage's model when it starts from one, else the experiment's
  `model` with the stage's `model` / `student` fields over it."""
  sc = c.stages[name]
  init = _stage_ref(c, sc.get("init"))
  if init:
    return stage_model(c, init)
  key = _model_key(sc)
  return model_config(c, sc[key] if key else None)


def stage_tokenizer(c: ml_collections.ConfigDict, name: str) -> str:
  """The tokenizer path of the model stage `name` trains, samples or evaluates: its
  own `tokenizer_path`, else its init stage's, else data.tokenizer_path ("" = the
  toy tokenizer the run trains)."""
  sc = c.stages[name]
  if sc.get("tokenizer_path"):
    return sc.tokenizer_path
  init = _stage_ref(c, sc.get("init"))
  return stage_tokenizer(c, init) if init else c.data.tokenizer_path


def teacher_tokenizer(c: ml_collections.ConfigDict, name: str) -> str:
  """A distill stage's teacher's tokenizer path: its stage's, or data.tokenizer_path."""
  teacher = _stage_ref(c, c.stages[name].teacher)
  return stage_tokenizer(c, teacher) if teacher else c.data.tokenizer_path


def teacher_model(c: ml_collections.ConfigDict, name: str) -> ModelConfig:
  """The model a distill stage's teacher is: its stage's, or the experiment's for "hf:"."""
  teacher = _stage_ref(c, c.stages[name].teacher)
  return stage_model(c, teacher) if teacher else model_config(c)


def optim_config(sc: ml_collections.ConfigDict) -> OptimConfig:
  return OptimConfig(**sc.optim.to_dict())
