"""r1jax: DeepSeek-R1 end to end in JAX/Flax.

Importing r1jax before JAX opens its CPU backend switches off XLA:CPU's YNNPACK
library fusions (`--xla_cpu_experimental_ynn_fusion_type=` appended to
XLA_FLAGS, unless XLA_FLAGS already sets that flag). Those fusions pulled the
attention softmax, reductions included, into the operand of the next matmul
and ran it there: on `bench.peer` (r1jax/tools/bench.py), compiled both ways in
one process and timed alternately, the forward took 0.35 s with them and 0.20 s
without, the train step 0.81 s and 0.71 s (best of 10). Only CPU compiles read
the flag; results change by float rounding only.
"""

import os

_YNN_FLAG = "--xla_cpu_experimental_ynn_fusion_type"


def _set_cpu_flags() -> None:
  flags = os.environ.get("XLA_FLAGS", "")
  if _YNN_FLAG not in flags:
    os.environ["XLA_FLAGS"] = f"{flags} {_YNN_FLAG}=".strip()


_set_cpu_flags()
