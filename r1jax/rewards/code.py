"""Code reward: the last fenced Python block, run against MBPP-style tests.

`example["tests"]` is a list of Python statements run after the candidate's
code (e.g. "assert add(1, 2) == 3"). Every test runs in its own fresh sandboxed
process (`sandbox.py`), so one test cannot leave state for the next and a
crash costs only that test. Two kinds of test:

value tests: a single `assert <expr> <op> <literal>` (or `<literal> <op>
  <expr>`; ops ==, !=, <, <=, >, >=, in, not in, and `is`/`is not` with
  None/True/False). Only `<expr>` is evaluated in the child; its value comes
  back as plain data of builtin types and the comparison runs here, in the
  parent. An object with a rigged `__eq__`, a patched `assert` or a fake
  "passed" cannot pass, and the expected value never enters the child.
statement tests: anything else, executed in the child; passed when the
  harness reports that the statement completed (see harness.py for why
  candidate code cannot forge that report).

Reward = fraction of tests passed (`binary=True`: 1 only if all pass).

Where the sandbox cannot isolate (no namespaces, see sandbox.py) the reward
refuses to run (`sandbox.SandboxUnavailable`) unless the config opts into the
unsafe audit-hook sandbox: `("code", 1.0, {"allow_unsafe_sandbox": True})`.
"""

from __future__ import annotations

import ast
import dataclasses
import json
import operator
import re
import time
from collections.abc import Mapping, Sequence
from typing import Any, Callable

from r1jax.rewards import sandbox
from r1jax.rewards.text import answer_region

_FENCE = re.compile(r"```[ \t]*([A-Za-z0-9_+\-]*)[^\n]*\n(.*?)```", re.DOTALL)
_PYTHON_TAGS = ("", "python", "python3", "py")
_OPS: dict[type, Callable[[Any, Any], bool]] = {
    ast.Eq: operator.eq, ast.NotEq: operator.ne, ast.Lt: operator.lt,
    ast.LtE: operator.le, ast.Gt: operator.gt, ast.GtE: operator.ge,
    ast.In: lambda a, b: a in b, ast.NotIn: lambda a, b: a not in b,
    ast.Is: operator.is_, ast.IsNot: operator.is_not}


def extract_code(completion: str) -> str | None:
  """The last fenced Python block after the reasoning, or None."""
  blocks = [m.group(2) for m in _FENCE.finditer(answer_region(completion))
            if m.group(1).lower() in _PYTHON_TAGS]
  return blocks[-1] if blocks and blocks[-1].strip() else None


@dataclasses.dataclass(frozen=True)
class Plan:
  kind: str  # "eval": value test; "exec": statement test
  src: str  # what the child runs
  check: Callable[[Any], bool] | None = None  # value -> passed (value tests)


def plan_test(test: str) -> Plan:
  """Splits an `assert expr op literal` into a value test, else a statement."""
  try:
    tree = ast.parse(test)
  except SyntaxError:
    return Plan("exec", test)
  if len(tree.body) != 1 or not isinstance(tree.body[0], ast.Assert):
    return Plan("exec", test)
  cmp = tree.body[0].test
  if not isinstance(cmp, ast.Compare) or len(cmp.ops) != 1:
    return Plan("exec", test)
  op, left, right = type(cmp.ops[0]), cmp.left, cmp.comparators[0]
  sides = []
  for node in (left, right):
    try:
      sides.append((True, ast.literal_eval(node)))
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
      sides.append((False, None))
  (left_lit, left_val), (right_lit, right_val) = sides
  if left_lit == right_lit or op not in _OPS:
    return Plan("exec", test)
  literal = right_val if right_lit else left_val
  if op in (ast.Is, ast.IsNot) and not any(literal is c for c in (None, True, False)):
    return Plan("exec", test)
  fn = _OPS[op]
  expr = ast.unparse(left if right_lit else right)
  check = (lambda v: fn(v, literal)) if right_lit else (lambda v: fn(literal, v))
  return Plan("eval", expr, check)


def decode_value(text: str) -> Any:
  """Inverse of the harness's encoder; raises ValueError on anything else."""
  def dec(node: Any, depth: int) -> Any:
    if depth > 64 or not isinstance(node, list) or not node:
      raise ValueError("bad value")
    tag, args = node[0], node[1:]
    match tag:
      case "n": return None
      case "b": return bool(args[0])
      case "i": return int(args[0], 16)
      case "f": return float.fromhex(args[0])
      case "c": return complex(float.fromhex(args[0]), float.fromhex(args[1]))
      case "s": return bytes.fromhex(args[0]).decode("utf-8", "surrogatepass")
      case "y": return bytes.fromhex(args[0])
      case "l": return [dec(x, depth + 1) for x in args[0]]
      case "t": return tuple(dec(x, depth + 1) for x in args[0])
      case "S": return {dec(x, depth + 1) for x in args[0]}
      case "F": return frozenset(dec(x, depth + 1) for x in args[0])
      case "d": return {dec(k, depth + 1): dec(v, depth + 1) for k, v in args[0]}
    raise ValueError(f"bad tag {tag!r}")
  try:
    return dec(json.loads(text), 0)
  except (TypeError, KeyError, IndexError, UnicodeError, RecursionError, OverflowError) as e:
    raise ValueError(f"bad value: {type(e).__name__}") from e


@dataclasses.dataclass(frozen=True)
class Outcome:
  passed: bool
  status: str  # sandbox status, or "wrong" when the value did not match
  wall_s: float


def run_tests(code: str, tests: Sequence[str],
              limits: sandbox.SandboxLimits = sandbox.SandboxLimits(),
              budget_s: float | None = None, *,
              allow_unsafe_sandbox: bool = False) -> list[Outcome]:
  """Runs each test in its own sandbox; `budget_s` caps the total wall time."""
  info = sandbox.sandbox_info(allow_unsafe=allow_unsafe_sandbox)
  deadline = time.monotonic() + (budget_s if budget_s is not None else float("inf"))
  outcomes = []
  for test in tests:
    left = deadline - time.monotonic()
    if left <= 0.05:
      outcomes.append(Outcome(False, "skipped", 0.0))
      continue
    plan = plan_test(test)
    run = sandbox.run_job(code, plan.kind, plan.src,
                          dataclasses.replace(limits, wall_s=min(limits.wall_s, left)),
                          info=info)
    passed, status = False, run.status
    if run.status == "ok" and plan.check is None:
      passed = True
    elif run.status == "ok":
      try:
        passed = bool(plan.check(decode_value(run.payload)))
      except (ValueError, TypeError, ArithmeticError, RecursionError):
        passed = False
      status = "ok" if passed else "wrong"
    outcomes.append(Outcome(passed, status, run.wall_s))
  return outcomes


def code(completion: str, example: Mapping[str, Any], *, binary: bool = False,
         limits: sandbox.SandboxLimits = sandbox.SandboxLimits(),
         budget_s: float = 10.0, allow_unsafe_sandbox: bool = False) -> float:
  """Fraction of `example["tests"]` passed by the last Python block, in [0, 1].

  `allow_unsafe_sandbox`: where no namespace sandbox works, run under the
  audit-hook-only one instead of refusing (sandbox.py, "restricted").
  """
  # Refuse before anything else, so a misconfigured machine fails on the
  # first call, not only on the first completion that has code.
  sandbox.sandbox_info(allow_unsafe=allow_unsafe_sandbox)
  tests = example["tests"]
  if isinstance(tests, str) or not tests:
    raise ValueError("example['tests'] must be a non-empty list of statements")
  program = extract_code(completion)
  if program is None:
    return 0.0
  outcomes = run_tests(program, list(tests), limits, budget_s,
                       allow_unsafe_sandbox=allow_unsafe_sandbox)
  passed = sum(o.passed for o in outcomes)
  if binary:
    return float(passed == len(outcomes))
  return passed / len(outcomes)
