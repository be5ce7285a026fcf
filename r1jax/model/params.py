"""Parameter initialisation and counting from abstract shapes."""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AbstractMesh

from r1jax.model.config import ModelConfig
from r1jax.model.transformer import Transformer


def _dummy_tokens():
  return jnp.zeros((1, 4), jnp.int32)


def _init(cfg: ModelConfig, rng: jax.Array) -> dict:
  # The init pass only creates parameters: its 4 dummy tokens must not take the
  # expert-parallel path an ambient mesh would turn on (they do not split over it).
  with jax.sharding.use_abstract_mesh(AbstractMesh((), ())):
    return Transformer(cfg).init(rng, _dummy_tokens())


def init_params(cfg: ModelConfig, rng: jax.Array) -> dict:
  """Unboxed parameters (MTP included when cfg.mtp_depth > 0)."""
  return nn.unbox(_init(cfg, rng)["params"])


def abstract_params(cfg: ModelConfig, boxed: bool = False):
  """Parameter ShapeDtypeStructs (with logical-axis metadata if boxed), no allocation."""
  tree = jax.eval_shape(functools.partial(_init, cfg), jax.random.key(0))["params"]
  return tree if boxed else nn.unbox(tree)


def logical_axes(cfg: ModelConfig):
  """A tree of PartitionSpecs of logical axis names, one per parameter."""
  return nn.get_partition_spec(abstract_params(cfg, boxed=True))


def _size(tree) -> int:
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))


def param_counts(cfg: ModelConfig) -> dict:
  """Counts from abstract shapes.

  total: the main model's trained parameters (embedding, all layers, final
      norm, output head), without MTP and without the routers' correction
      biases, which are buffers updated by a rule, not by gradient (counted
      apart in `router_bias`; the official 671B figure leaves them out too).
  mtp: the MTP modules' own parameters (they share the embedding and head).
  activated: parameters a token touches in the main model — total minus the
      routed experts it is not sent to (n_routed − n_activated per MoE layer).
  activated_no_embed: the same without the embedding and the output head.
  """
  tree = abstract_params(cfg)
  biases = [x for path, x in jax.tree_util.tree_leaves_with_path(tree)
            if "router" in jax.tree_util.keystr(path) and "bias" in jax.tree_util.keystr(path)]
  n_bias_main = cfg.n_moe_layers * cfg.n_routed_experts if cfg.n_moe_layers else 0
  mtp = sum(_size(v) for k, v in tree.items() if k.startswith("mtp_"))
  mtp -= _size(biases) - n_bias_main
  total = _size(tree) - mtp - _size(biases)
  per_expert = 3 * cfg.d_model * cfg.moe_d_ff
  idle = (cfg.n_routed_experts - cfg.n_activated_experts) * per_expert * cfg.n_moe_layers
  embed_head = _size(tree["embed"]) + (_size(tree["lm_head"]) if "lm_head" in tree else 0)
  activated = total - idle
  return {"total": total, "mtp": mtp, "activated": activated,
          "activated_no_embed": activated - embed_head, "embed_head": embed_head,
          "router_bias": _size(biases)}
