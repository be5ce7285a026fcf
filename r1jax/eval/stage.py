"""The `eval` stage: benchmarks an earlier stage's weights (or a Hugging Face checkpoint)."""

from __future__ import annotations

from r1jax.eval import benchmarks as benchmarks_lib
from r1jax.eval import evaluate as eval_lib
from r1jax.pipeline import stages
from r1jax.pipeline.context import Context, jsonable


def sampling(sc) -> eval_lib.Sampling:
  return eval_lib.Sampling(samples=sc.samples, temperature=sc.temperature, top_p=sc.top_p,
                           top_k=sc.top_k, template=sc.template,
                           max_prompt_len=sc.max_prompt_len, max_new_tokens=sc.max_new_tokens,
                           batch_rows=sc.batch_rows)


def eval_stage(ctx: Context, name: str, sc, inputs: dict, stage_dir: str) -> dict:
  """Writes eval.json and samples.jsonl; returns "<benchmark>/<metric>" figures."""
  cfg, params = stages._init(ctx, sc, inputs)  # noqa: SLF001 - the one way stages find weights
  if params is None:
    raise ValueError(f"stages.{name}.init: an eval stage needs weights ('stage:<name>' or "
                     "'hf:<dir>')")
  benches = benchmarks_lib.load(benchmarks_lib.parse(sc.benchmarks), ctx.eval_examples,
                                sc.max_prompts, ctx.general_eval)
  results, records = eval_lib.run(ctx, cfg, params, benches, sampling(sc),
                                  stages.stage_seed(ctx.c.seed, name, "eval"), sc.pass_ks)
  eval_lib.write(ctx, stage_dir, results, records)
  eval_lib.log_table(ctx, results)
  return jsonable({f"{b}/{k}": v for b, m in results.items() for k, v in m.items()})
