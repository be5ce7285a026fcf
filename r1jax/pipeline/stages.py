"""The training stages of DeepSeek-R1, each `(ctx, name, sc, inputs, stage_dir) -> outputs`.

outputs is a JSON-able dict: "checkpoint" + "model" for stages that produce
weights, "dataset" for stages that produce data, and the stage's figures.
"""

from __future__ import annotations

import dataclasses
import hashlib
import random

import jax
import numpy as np

from r1jax import configs, storage
from r1jax.data import chat as chat_lib
from r1jax.data import pipelines
from r1jax.data import tokenizer as tokenizer_lib
from r1jax.model import ModelConfig, param_counts
from r1jax.parallel import multihost
from r1jax.pipeline.context import Context, jsonable, pretrain_document
from r1jax.rewards import RewardEvaluator, RewardSpec
from r1jax.rl.rollout import sample
from r1jax.train import checkpoint as ckpt_lib
from r1jax.train import metrics as metrics_lib
from r1jax.train import trainer


def _ref(value: str) -> str:
  return value[len("stage:"):]


def stage_seed(run_seed: int, stage: str, purpose: str) -> int:
  """A seed for one use (`purpose`: "rollout", "prompts", "eval", ...) in one stage.

  A stable hash (not Python's salted `hash`) of the run seed, the stage name and
  the purpose: two stages of one run (R1's reasoning and alignment GRPO) draw
  different prompts and samples, and a rerun or another process draws the same."""
  digest = hashlib.sha256(f"{run_seed}/{stage}/{purpose}".encode()).digest()
  return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


def _init(ctx: Context, sc, inputs: dict, field: str = "init",
          fresh: ModelConfig | None = None) -> tuple[ModelConfig, object]:
  """(model config, params or None for a fresh start) named by `sc.<field>`:
  "stage:<name>" (an earlier stage's weights), "hf:<dir>" (a Hugging Face
  DeepSeek-V3/R1, Qwen2 or Llama checkpoint in safetensors) or "" (fresh: the
  `fresh` model, default the experiment's, which also gives "hf:" its dtypes)."""
  fresh = fresh or ctx.model_cfg
  ref = sc[field]
  if ref.startswith("stage:"):
    return ctx.load_params(inputs[_ref(ref)])
  if ref.startswith("hf:"):
    from r1jax.interop import hf  # noqa: PLC0415
    # Streamed onto the mesh: each process reads only the slices its devices hold.
    cfg, params = hf.load(ref[len("hf:"):], mesh=ctx.mesh, dtype=fresh.param_dtype)
    return cfg.replace(dtype=fresh.dtype, param_dtype=fresh.param_dtype,
                       remat=fresh.remat), params
  return fresh, None



def _encode(ctx: Context, sc, pairs, eval_pairs) -> tuple[dict, dict]:
  """(train rows, held-out rows) of (prompt, response) pairs, loss on the response."""
  rows, dropped = pipelines.encode_rows(ctx.tok, pairs, sc.seq_len)
  eval_rows, _ = pipelines.encode_rows(ctx.tok, eval_pairs, sc.seq_len)
  if dropped:
    ctx.log(f"  dropped {dropped} of {len(pairs)} rows longer than seq_len={sc.seq_len}")
  return rows, eval_rows


def _supervised(ctx: Context, name: str, sc, stage_dir: str, cfg: ModelConfig, params,
                rows: dict, eval_rows: dict) -> dict:
  """Trains on encoded rows, saves the weights, and evaluates if the stage asks."""
  params, summary = trainer.train_supervised(
      ctx, stage_dir, cfg=cfg, params=params, rows=rows, eval_rows=eval_rows,
      ocfg=configs.optim_config(sc), steps=sc.steps, batch_size=sc.batch_size,
      seed=stage_seed(ctx.c.seed, name, "train"),
      log_every=sc.log_every, checkpoint_every=sc.checkpoint_every,
      micro_batches=sc.micro_batches)
  ctx.log(f"  held-out loss {summary['eval_loss_before']:.3f} -> "
          f"{summary['eval_loss_after']:.3f}")
  out = {**ctx.save_params(stage_dir, cfg, params), **summary}
  if sc.eval_prompts:
    ev = evaluate(ctx, cfg, params, sc, template=sc.eval_template,
                  max_prompt_len=sc.eval_max_prompt_len, max_new_tokens=sc.eval_max_new_tokens,
                  seed=stage_seed(ctx.c.seed, name, "eval"))
    _write_samples(ctx, stage_dir, {"after": ev.pop("samples")})
    ctx.log(f"  held-out accuracy {ev['accuracy']:.3f}  format {ev['format']:.3f}")
    out.update({f"{k}_after": v for k, v in ev.items()})
  return jsonable(out)


def _write_samples(ctx: Context, stage_dir: str, samples: dict) -> None:
  if ctx.is_main_process:
    storage.write_json(storage.join(stage_dir, "samples.json"), samples, indent=1,
                       ensure_ascii=False)


# ----------------------------------------------------------------------------
# pretrain and sft

def pack_documents(tok, docs: list[str], seq_len: int) -> dict:
  """Documents packed greedily into rows of `seq_len` tokens, each ended by EOS; the loss
  covers every token. Packed documents see each other (no per-document mask), as
  in ordinary LM pre-training; a document longer than a row is cut."""
  start = [] if tok.bos_id is None else [tok.bos_id]  # Qwen2.5's tokenizer has no BOS
  rows, row = [], list(start)
  for doc in docs:
    ids = tok.encode(doc)[:seq_len - 2] + [tok.eos_id]
    if len(row) + len(ids) > seq_len:
      rows.append(row)
      row = list(start)
    row += ids
  rows.append(row)
  tokens = np.full((len(rows), seq_len), tok.pad_id, np.int32)
  valid = np.zeros((len(rows), seq_len), np.int32)
  for i, r in enumerate(rows):
    tokens[i, :len(r)] = r
    valid[i, :len(r)] = 1
  return {"tokens": tokens, "loss_mask": valid.copy(), "valid": valid}


def pretrain(ctx: Context, name: str, sc, inputs: dict, stage_dir: str) -> dict:
  """LM training on problems with worked solutions, packed into rows (every token counts)."""
  rng = random.Random(stage_seed(ctx.c.seed, name, "documents"))

  def rows(examples):
    docs = []
    for e in examples:
      template = rng.random() < sc.r1_zero_fraction
      docs.append(pretrain_document(e, "r1_zero" if template else "plain", rng,
                                    sc.wrong_answer_rate,
                                    sc.direct_answer_rate if template else 0.0,
                                    sc.mixed_language_rate))
    return pack_documents(ctx.tok, docs, sc.seq_len)

  cfg, params = _init(ctx, sc, inputs, fresh=configs.stage_model(ctx.c, name))
  train_rows = rows(ctx.train_examples)
  ctx.log(f"  {len(train_rows['tokens'])} packed rows")
  return _supervised(ctx, name, sc, stage_dir, cfg, params, train_rows, rows(ctx.eval_examples))


def _dataset_pairs(path: str) -> list[tuple[str, str]]:
  return [(r["prompt"], r["response"]) for r in storage.read_jsonl(path)]


def sft(ctx: Context, name: str, sc, inputs: dict, stage_dir: str) -> dict:
  if sc.data.startswith("chat:"):
    return _chat_sft(ctx, name, sc, inputs, stage_dir)
  cfg, params = _init(ctx, sc, inputs, fresh=configs.stage_model(ctx.c, name))
  if sc.data == "task":
    pairs = pipelines.sft_pairs(ctx.tok, ctx.train_examples, sc.template)
  else:
    # R1 §2.3.3 mixes the sampled reasoning data with other SFT data; here the
    # task's worked solutions stand in for it.
    extra = ctx.train_examples[:sc.extra_task_rows]
    pairs = (_dataset_pairs(inputs[_ref(sc.data)]["dataset"]) +
             pipelines.sft_pairs(ctx.tok, extra, sc.template))
  # R1 §2.3.3's non-reasoning data: answered at once, the one-sentence reasoning of
  # general.DIRECT in the think block (the format stays the reasoning data's).
  pairs += pipelines.sft_pairs(ctx.tok, ctx.general_train[:sc.general_rows], sc.template)
  if len(pairs) < sc.batch_size:
    raise RuntimeError(f"stage {name}: {len(pairs)} training rows, fewer than one batch of "
                       f"{sc.batch_size}; raise extra_task_rows or sample more upstream")
  eval_pairs = pipelines.sft_pairs(ctx.tok, ctx.eval_examples, sc.template)
  rows, eval_rows = _encode(ctx, sc, pairs, eval_pairs)
  return _supervised(ctx, name, sc, stage_dir, cfg, params, rows, eval_rows)


def _chat_sft(ctx: Context, name: str, sc, inputs: dict, stage_dir: str) -> dict:
  """SFT on a chat JSONL file: the tokenizer's chat template, loss on assistant tokens.
  The file's last tenth (at least one conversation) is held out for the loss. The
  data is read and checked before any weights are loaded."""
  path = sc.data[len("chat:"):]
  conversations = chat_lib.read_chat(path)
  n_eval = max(1, len(conversations) // 10)
  if len(conversations) - n_eval < sc.batch_size:
    raise RuntimeError(f"stage {name}: {path} has {len(conversations)} conversations; with "
                       f"{n_eval} held out, fewer than one batch of {sc.batch_size}")
  rows, dropped = chat_lib.chat_rows(ctx.tok, conversations[:-n_eval], sc.seq_len)
  eval_rows, _ = chat_lib.chat_rows(ctx.tok, conversations[-n_eval:], sc.seq_len)
  ctx.log(f"  {len(conversations) - n_eval} conversations from {path}, {n_eval} held out")
  if dropped:
    ctx.log(f"  dropped {dropped} conversations longer than seq_len={sc.seq_len}")
  if len(rows["tokens"]) < sc.batch_size or not len(eval_rows["tokens"]):
    raise RuntimeError(f"stage {name}: too few conversations of {path} fit in "
                       f"seq_len={sc.seq_len}; raise seq_len")
  cfg, params = _init(ctx, sc, inputs, fresh=configs.stage_model(ctx.c, name))
  return _supervised(ctx, name, sc, stage_dir, cfg, params, rows, eval_rows)


# ----------------------------------------------------------------------------
# Generation shared by evaluation, rejection sampling and distillation

@dataclasses.dataclass
class Generations:
  """Completions of one `generate` call, R rows in job order (example-major).

  tokens/finished are global (every process holds all rows); `mine` are the
  rows this process detokenises and scores (each row has one owner)."""
  examples: list[dict]  # [R] the example each row answers
  prompt_ids: list[list[int]]  # [R]
  tokens: list[list[int]]  # [R] completion ids, EOS dropped
  finished: np.ndarray  # [R] bool: ended with EOS
  mine: np.ndarray  # indices of this process's rows

  def completion(self, tok, i: int) -> str:
    return tok.decode(self.tokens[i])

  def prompt(self, tok, i: int) -> str:
    return tok.decode(self.prompt_ids[i])


def generate(ctx: Context, cfg: ModelConfig, params, examples: list[dict], *, template: str,
             samples: int, temperature: float, top_p: float, top_k: int, max_prompt_len: int,
             max_new_tokens: int, batch_rows: int, seed: int) -> Generations:
  """`samples` completions per example. Rows go through the sampler in fixed-size
  batches (one compilation); the last batch is filled with repeats that are dropped."""
  ids, kept, dropped = pipelines.encode_prompts(ctx.tok, examples, template, max_prompt_len)
  if dropped:
    ctx.log(f"  {dropped} prompts longer than max_prompt_len={max_prompt_len} skipped")
  jobs = [(i, s) for i in range(len(kept)) for s in range(samples)]
  tokens, finished, mine = [], [], []
  for b, start in enumerate(range(0, len(jobs), batch_rows)):
    chunk = jobs[start:start + batch_rows]
    filled = chunk + [chunk[-1]] * (batch_rows - len(chunk))
    prompts, lengths = pipelines.left_pad([ids[i] for i, _ in filled], max_prompt_len,
                                          ctx.tok.pad_id)
    ro = sample(cfg, params, prompts, lengths, max_new_tokens=max_new_tokens,
                rng=jax.random.fold_in(jax.random.key(seed), b), temperature=temperature,
                top_p=top_p, top_k=top_k, eos_id=ctx.tok.eos_id, pad_id=ctx.tok.pad_id,
                mesh=ctx.mesh)
    mine += [start + r for r in multihost.my_rows(ro.lengths) if r < len(chunk)]
    got = multihost.allgather({"tokens": ro.tokens, "lengths": ro.lengths,
                               "finished": ro.finished})
    for row in range(len(chunk)):
      n = int(got["lengths"][row]) - int(got["finished"][row])  # drop the EOS token
      tokens.append(got["tokens"][row, :n].tolist())
      finished.append(bool(got["finished"][row]))
  return Generations([kept[i] for i, _ in jobs], [ids[i] for i, _ in jobs], tokens,
                     np.array(finished, bool), np.array(mine, np.int64))


def score(ctx: Context, gens: Generations, terms) -> dict[str, np.ndarray]:
  """{reward name: [R] scores} on every process; each process scores its own rows."""
  texts = [gens.completion(ctx.tok, i) for i in gens.mine]
  # Length rewards read the completion's token count, as in a GRPO rollout.
  examples = [dict(gens.examples[i], completion_tokens=len(gens.tokens[i])) for i in gens.mine]
  with RewardEvaluator(RewardSpec.create(terms)) as ev:
    _, per, _ = ev(texts, examples)
  n = len(gens.tokens)
  return {k: multihost.gather_rows(v, gens.mine, n) for k, v in sorted(per.items())}


def reward_terms(terms, template: str) -> list[tuple]:
  """Reward terms with the template's format options filled in where a "format"
  term names none (an R1-chat completion starts inside <think> and ends in a
  \\boxed{} answer; an R1-Zero one uses the tags)."""
  options = dict(tokenizer_lib.get_template(template).format_options)
  out = []
  for t in terms:
    t = tuple(t)
    if t[0] == "format" and len(t) == 2 and options:
      t = (t[0], t[1], options)
    out.append(t)
  return out


def evaluate(ctx: Context, cfg: ModelConfig, params, sc, *, template: str, max_prompt_len: int,
             max_new_tokens: int, seed: int) -> dict:
  """The in-stage evaluation of sft and grpo: the eval stage's code path on the first
  `sc.eval_prompts` held-out problems, `sc.eval_samples` samples each, with the
  stage's eval_* sampling keys. Returns accuracy (pass@1), cons@k, format,
  language, truncated and response_len, and "samples" (the first few, to read)."""
  from r1jax.eval import evaluate as eval_lib  # noqa: PLC0415 - the eval package builds on this one
  sampling = eval_lib.Sampling(
      samples=sc.eval_samples, temperature=sc.eval_temperature, top_p=sc.eval_top_p,
      top_k=sc.eval_top_k, template=template, max_prompt_len=max_prompt_len,
      max_new_tokens=max_new_tokens, batch_rows=256)
  results, records = eval_lib.run(ctx, cfg, params,
                                  [("held_out", ctx.eval_examples[:sc.eval_prompts])],
                                  sampling, seed)
  if "held_out" not in results:
    raise ValueError(f"in-stage evaluation: none of the {sc.eval_prompts} held-out prompts fits "
                     f"max_prompt_len={max_prompt_len}; raise it or set eval_prompts=0")
  m, k = results["held_out"], sc.eval_samples
  return {"accuracy": m["pass@1"], f"cons@{k}": m[f"cons@{k}"], "format": m["format"],
          "language": m["language"], "truncated": m["truncated"],
          "response_len": m["response_len"],
          "samples": [{"prompt": r["question"], "completion": r["completion"],
                       "answer": r["gold"]} for r in records[:6]]}


def _eval_metrics(ev: dict, k: int) -> dict:
  """An in-stage evaluation as metric-row entries: pass@1 and cons@k over training."""
  return {"eval/accuracy": ev["accuracy"], f"eval/cons@{k}": ev[f"cons@{k}"]}


def batch_rows(ctx: Context, n: int, cap: int = 256) -> int:
  """A sampler batch size: ≥ n rows if it fits under cap, a multiple of the data axes."""
  m = ctx.n_data_parallel
  return max(m, min(cap, -(-n // m) * m))


# ----------------------------------------------------------------------------
# GRPO

def grpo(ctx: Context, name: str, sc, inputs: dict, stage_dir: str) -> dict:
  from r1jax.rl.step import GRPOConfig, GRPOStep  # noqa: PLC0415

  cfg, params = _init(ctx, sc, inputs)
  if params is None:
    raise ValueError(f"stages.{name}.init: GRPO needs a starting model ('stage:<name>')")
  g = GRPOConfig(**sc.grpo.to_dict())
  ocfg = configs.optim_config(sc)
  # Before and after share their sampling keys: a paired comparison.
  eval_kw = dict(template=sc.template, max_prompt_len=g.max_prompt_len,
                 max_new_tokens=g.max_new_tokens, seed=stage_seed(ctx.c.seed, name, "eval"))
  before = evaluate(ctx, cfg, params, sc, **eval_kw) if sc.eval_prompts else {}
  if before:
    ctx.log(f"  held-out before: accuracy {before['accuracy']:.3f}  format {before['format']:.3f}")
  prompts = ctx.train_examples + ctx.general_train[:sc.general_prompts]
  examples, dropped = pipelines.prompt_examples(ctx.tok, prompts, template=sc.template,
                                                max_prompt_len=g.max_prompt_len,
                                                seed=stage_seed(ctx.c.seed, name, "prompts"))
  spec = RewardSpec.create(reward_terms(sc.rewards, sc.template), timeout_s=sc.reward_timeout_s,
                           num_workers=sc.reward_workers)
  with RewardEvaluator(spec) as evaluator:
    step_fn = GRPOStep(cfg, g, ocfg, evaluator, decode=ctx.tok.decode, eos_id=ctx.tok.eos_id,
                       pad_id=ctx.tok.pad_id, mesh=ctx.mesh)
    state = step_fn.init_state(params)
    del params
    ckpt = ckpt_lib.Checkpointer(storage.join(stage_dir, "checkpoints"),
                                 every=sc.checkpoint_every)
    if ckpt.latest_step is not None:
      state, data_state = ckpt.restore(ckpt_lib.abstract_like(state))
      examples.restore(data_state)
      ctx.log(f"  resuming from step {int(state.step)}")
    writer = metrics_lib.MetricWriter(stage_dir, total_steps=sc.steps,
                                      start_step=int(state.step),
                                      show=("reward/mean", "accuracy", "kl"), desc=name)
    rng = jax.random.key(stage_seed(ctx.c.seed, name, "rollout"))
    # A GRPO step counts as refused when any of its updates was (skipped_nonfinite is
    # the fraction of them); that many steps in a row stop the stage.
    guard = trainer.NonFiniteGuard(name, ocfg.max_nonfinite_steps)
    last_eval = None
    if before and sc.eval_every and int(state.step) == 0:
      writer.write(0, _eval_metrics(before, sc.eval_samples))
    while int(state.step) < sc.steps:
      state, m = step_fn(state, examples, rng)
      step = int(state.step)
      periodic = bool(sc.eval_prompts and sc.eval_every and
                      (step % sc.eval_every == 0 or step == sc.steps))
      if periodic:  # the last step's is also `after`, below
        last_eval = (step, evaluate(ctx, cfg, state.params, sc, **eval_kw))
        m.update(_eval_metrics(last_eval[1], sc.eval_samples))
      if step % sc.log_every == 0 or step == sc.steps or m["skipped_nonfinite"] or periodic:
        writer.write(step, m)
      try:
        guard(step, m["skipped_nonfinite"])
      except ckpt_lib.NonFiniteError:
        writer.close()  # the refused steps' metrics and the finished checkpoints stay
        ckpt.close()
        raise
      if ckpt.save(step, state, examples.state(), force=step == sc.steps):
        writer.flush()
    writer.close()
    ckpt.close()
  after = {}
  if sc.eval_prompts:  # 0: no in-stage evaluation (an eval stage may follow)
    done = last_eval is not None and last_eval[0] == int(state.step)
    after = last_eval[1] if done else evaluate(ctx, cfg, state.params, sc, **eval_kw)
    ctx.log(f"  held-out after:  accuracy {after['accuracy']:.3f}  format {after['format']:.3f}")
    _write_samples(ctx, stage_dir, {"before": before.pop("samples"),
                                    "after": after.pop("samples")})
  out = ctx.save_params(stage_dir, cfg, state.params)
  out.update({"steps": int(state.step), "prompts_dropped": dropped})
  out.update({f"{k}_before": v for k, v in before.items()})
  out.update({f"{k}_after": v for k, v in after.items()})
  return jsonable(out)


# ----------------------------------------------------------------------------
# Rejection sampling and distillation

FILTER_REWARDS = (("accuracy", 1.0), ("format", 1.0), ("language", 1.0), ("repetition", 1.0))


def _sample_and_filter(ctx: Context, cfg: ModelConfig, params, sc, stage_dir: str,
                       seed: int) -> dict:
  """R1 §2.3.3: keep correct completions; drop mixed-language, malformed, repetitive
  and unfinished ones; at most keep_per_prompt per prompt. Process 0 writes
  dataset.jsonl; every process computes the same choice from the gathered scores."""
  examples = ctx.train_examples[:sc.prompts]
  gens = generate(ctx, cfg, params, examples, template=sc.template,
                  samples=sc.samples_per_prompt, temperature=sc.temperature, top_p=sc.top_p,
                  top_k=sc.top_k,
                  max_prompt_len=sc.max_prompt_len, max_new_tokens=sc.max_new_tokens,
                  batch_rows=sc.batch_rows, seed=seed)
  per = score(ctx, gens, reward_terms(FILTER_REWARDS, sc.template))
  kept, per_prompt = [], {}
  reasons = {"wrong": 0, "format": 0, "language": 0, "repetitive": 0, "long_paragraph": 0,
             "code_block": 0, "unfinished": 0, "over_quota": 0}
  for i, example in enumerate(gens.examples):
    if per["accuracy"][i] < 1:
      reasons["wrong"] += 1
    elif per["format"][i] < 1:
      reasons["format"] += 1
    elif per["language"][i] < sc.min_language:
      reasons["language"] += 1
    elif per["repetition"][i] < -sc.max_repetition:
      reasons["repetitive"] += 1
    elif flaw := reasoning_flaw(gens.completion(ctx.tok, i), sc.max_paragraph_chars,
                                sc.reject_code_blocks):
      reasons[flaw] += 1
    elif not gens.finished[i]:
      reasons["unfinished"] += 1
    else:
      q = example["question"]
      if per_prompt.get(q, 0) >= sc.keep_per_prompt:
        reasons["over_quota"] += 1
        continue
      per_prompt[q] = per_prompt.get(q, 0) + 1
      kept.append(i)
  path = storage.join(stage_dir, "dataset.jsonl")
  if ctx.is_main_process:
    storage.write_jsonl(path, [{"prompt": gens.prompt(ctx.tok, i),
                        "response": gens.completion(ctx.tok, i),
                        "question": gens.examples[i]["question"],
                        "answer": gens.examples[i]["answer"],
                        "language": gens.examples[i]["language"]} for i in kept])
  multihost.barrier(f"dataset {path}")  # the next stage reads it on every process
  ctx.log(f"  kept {len(kept)} of {len(gens.tokens)} samples from {len(examples)} prompts; "
          f"rejected: {reasons}")
  return {"dataset": path, "rows_kept": len(kept),
          "samples": len(gens.tokens), "prompts_covered": len(per_prompt),
          "accept_rate": len(kept) / max(len(gens.tokens), 1),
          **{f"rejected_{k}": v for k, v in reasons.items()}}


def reasoning_flaw(completion: str, max_paragraph_chars: int, reject_code_blocks: bool
                   ) -> str | None:
  """Why R1's filter (§2.3.3) would drop this chain of thought, or None: "code_block"
  (a fenced block in the reasoning) or "long_paragraph" (one over the limit; 0 = off).
  The reasoning is what precedes the last </think> (all of it if there is none)."""
  head, found, _ = completion.rpartition("</think>")
  reasoning = head if found else completion
  if reject_code_blocks and "```" in reasoning:
    return "code_block"
  if max_paragraph_chars and any(len(p.strip()) > max_paragraph_chars
                                 for p in reasoning.split("\n\n")):
    return "long_paragraph"
  return None


def rejection_sample(ctx: Context, name: str, sc, inputs: dict, stage_dir: str) -> dict:
  cfg, params = _init(ctx, sc, inputs)
  if params is None:
    raise ValueError(f"stages.{name}.init: rejection sampling needs a model ('stage:<name>')")
  out = _sample_and_filter(ctx, cfg, params, sc, stage_dir,
                           stage_seed(ctx.c.seed, name, "sample"))
  if not out["rows_kept"]:
    ctx.log(f"  WARNING: no sample passed the filters; the model from {sc.init} may be too "
            "weak (raise samples_per_prompt, or train it longer)")
  return out


def distill(ctx: Context, name: str, sc, inputs: dict, stage_dir: str) -> dict:
  """`ctx` holds the student's tokenizer; the teacher samples with its own, and the
  traces reach the student as text (R1's Qwen and Llama students re-tokenize them)."""
  teacher_ctx = ctx.with_tokenizer(configs.teacher_tokenizer(ctx.c, name))
  teacher_cfg, teacher = _init(teacher_ctx, sc, inputs, "teacher")
  if teacher is None:
    raise ValueError(f"stages.{name}.teacher: name a model ('stage:<name>' or 'hf:<dir>')")
  traces = _sample_and_filter(teacher_ctx, teacher_cfg, teacher, sc, stage_dir,
                              stage_seed(ctx.c.seed, name, "sample"))
  del teacher
  student_cfg, student = _init(ctx, sc, inputs, fresh=configs.stage_model(ctx.c, name))
  pairs = (_dataset_pairs(traces["dataset"]) +
           pipelines.sft_pairs(ctx.tok, ctx.train_examples[:sc.extra_task_rows], sc.template))
  if len(pairs) < sc.batch_size:
    raise RuntimeError(f"stage {name}: the teacher left {traces['rows_kept']} usable traces, "
                       f"fewer than one batch of {sc.batch_size}")
  eval_pairs = pipelines.sft_pairs(ctx.tok, ctx.eval_examples, sc.template)
  rows, eval_rows = _encode(ctx, sc, pairs, eval_pairs)
  out = _supervised(ctx, name, sc, stage_dir, student_cfg, student, rows, eval_rows)
  out.update({f"traces_{k}": v for k, v in traces.items() if k != "dataset"})
  out["dataset"] = traces["dataset"]
  out["student_params"] = param_counts(student_cfg)["total"]
  out["teacher_params"] = param_counts(teacher_cfg)["total"]
  return out
