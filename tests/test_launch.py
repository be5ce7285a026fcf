"""Launchers: the exact commands their --dry_run prints (nothing is run)."""

import glob
import importlib.util
import os
import shlex
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load(name: str):
  spec = importlib.util.spec_from_file_location(f"launch_{name}",
                                                os.path.join(ROOT, "launch", f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _experiment() -> str:
  files = sorted(glob.glob("experiments/**/*.py", root_dir=ROOT, recursive=True))
  assert files, "no experiment file to launch"
  return files[0]


def _lines(capsys, module, argv) -> list[str]:
  assert module.main(argv) == 0
  return capsys.readouterr().out.splitlines()


def test_tpu_pod_dry_run(capsys):
  config = _experiment()
  lines = _lines(capsys, _load("tpu_pod"), [
      "--tpu=pod-1", "--zone=us-east5-a", "--project=proj", f"--config={config}:smoke",
      "--workdir=gs://bucket/run 1", "--dry_run", "--", "--stages=sft,grpo"])
  tar, scp, install, run = (shlex.split(line) for line in lines)
  assert tar[:2] == ["tar", "-czf"] and "--exclude=.git" in tar and tar[-3:] == ["-C", ROOT, "."]
  assert scp[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "scp", tar[2]]
  for cmd in (scp, install, run):
    assert {"--worker=all", "--zone=us-east5-a", "--project=proj"} <= set(cmd)
  assert install[4:6] == ["ssh", "pod-1"] and "pip install -q -e ." in install[-1]
  remote = run[-1].removeprefix("--command=")
  assert run[4:6] == ["ssh", "pod-1"]
  assert shlex.split(remote.split("&&")[1]) == [
      "R1JAX_DISTRIBUTED=auto", "python3", "-m", "r1jax.main", f"--config={config}:smoke",
      "--workdir=gs://bucket/run 1", "--stages=sft,grpo"]


def test_tpu_pod_skip_setup_and_checks(capsys):
  module = _load("tpu_pod")
  base = ["--tpu=p", "--zone=z", f"--config={_experiment()}", "--dry_run"]
  (line,) = _lines(capsys, module, base + ["--workdir=gs://b/r", "--skip_setup"])
  assert "--project" not in line and "R1JAX_DISTRIBUTED=auto" in line
  with pytest.raises(SystemExit):
    module.main(base + ["--workdir=/local/dir"])
  assert "gs://" in capsys.readouterr().err
  with pytest.raises(SystemExit):
    module.main(["--tpu=p", "--zone=z", "--config=experiments/nope.py", "--workdir=gs://b",
                 "--dry_run"])


def test_slurm_dry_run_renders_a_valid_script(capsys, tmp_path):
  config = _experiment()
  script = str(tmp_path / "job.sbatch")
  lines = _lines(capsys, _load("slurm"), [
      "--nodes=3", "--gpus_per_node=4", f"--config={config}", "--workdir=/shared/run",
      "--partition=gpu", f"--script={script}", "--dry_run", "--", "--stages=sft"])
  assert lines[0] == f"sbatch {script}"
  text = "\n".join(lines[1:]) + "\n"
  for expected in ("#SBATCH --nodes=3", "#SBATCH --gpus-per-node=4",
                   "#SBATCH --ntasks-per-node=4", "#SBATCH --partition=gpu",
                   f"CONFIG={config}", "WORKDIR=/shared/run", "EXTRA_ARGS=(--stages=sft)",
                   "export R1JAX_DISTRIBUTED=auto", "srun --kill-on-bad-exit=1",
                   "-m r1jax.main --config=\"$CONFIG\" --workdir=\"$WORKDIR\""):
    assert expected in text
  assert not os.path.exists(script)  # a dry run writes nothing
  rendered = tmp_path / "check.sbatch"
  rendered.write_text(text)
  assert subprocess.run(["bash", "-n", str(rendered)]).returncode == 0


def test_slurm_template_refuses_a_missing_config(tmp_path):
  env = {k: v for k, v in os.environ.items() if k not in ("CONFIG", "WORKDIR")}
  out = subprocess.run(["bash", os.path.join(ROOT, "launch", "slurm.sbatch")], env=env,
                       capture_output=True, text=True, cwd=tmp_path)
  assert out.returncode == 2 and "set CONFIG" in out.stderr


def test_local_dry_run(capsys):
  command = ["python", "-m", "r1jax.main", f"--config={_experiment()}", "--workdir=/tmp/mp"]
  lines = _lines(capsys, _load("local"), ["--num_processes=2", "--devices_per_process=4",
                                          "--dry_run", "--", *command])
  assert len(lines) == 2
  for i, line in enumerate(lines):
    words = shlex.split(line)
    env = dict(w.split("=", 1) for w in words[:4])
    assert env["R1JAX_NUM_PROCESSES"] == "2" and env["R1JAX_PROCESS_ID"] == str(i)
    assert env["R1JAX_COORDINATOR"].startswith("127.0.0.1:")
    assert "--xla_force_host_platform_device_count=4" in env["XLA_FLAGS"]
    assert words[4:] == command


@pytest.mark.parametrize("failing", ["0", "1"])
def test_local_stops_the_others_when_one_fails(failing):
  """A process that takes SIGTERM as a preemption notice (jax.distributed does) is
  killed after the grace period, and the failure's exit status comes back, whichever
  process failed (the first one's failure once ended the launcher in a traceback)."""
  script = ("import os, signal, sys, time\n"
            f"if os.environ['R1JAX_PROCESS_ID'] == '{failing}': sys.exit(3)\n"
            "signal.signal(signal.SIGTERM, lambda *a: None)\n"
            "time.sleep(120)\n")
  out = subprocess.run([sys.executable, "launch/local.py", "--num_processes=2", "--",
                        sys.executable, "-c", script], cwd=ROOT, timeout=60,
                       capture_output=True, text=True)
  assert out.returncode == 3
  assert "Traceback" not in out.stderr + out.stdout


def test_a_bad_launch_is_a_one_line_error(tmp_path):
  env = {**os.environ, "R1JAX_NUM_PROCESSES": "2", "R1JAX_PROCESS_ID": "5",
         "R1JAX_COORDINATOR": "127.0.0.1:1"}
  out = subprocess.run([sys.executable, "-m", "r1jax.main", f"--config={_experiment()}",
                        f"--workdir={tmp_path}"], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=120)
  assert out.returncode != 0
  lines = [l for l in out.stderr.splitlines() if "bad launch" in l]
  assert lines and "R1JAX_PROCESS_ID=5 is outside 0..1 (R1JAX_NUM_PROCESSES=2)" in lines[0]
  assert "Traceback" not in out.stderr


def test_hugepage_tunable_reaches_entry_points_and_children():
  """glibc's huge-page tunable (r1jax/__init__.py): added once, kept when set,
  dropped by R1JAX_HUGEPAGES=0; an entry point restarts itself with it; the local
  launcher hands it to its processes."""
  import r1jax
  if not r1jax._thp_usable():
    pytest.skip("no glibc with transparent huge pages here")
  base = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
  assert r1jax.hugepage_env(base)["GLIBC_TUNABLES"] == "glibc.malloc.hugetlb=1"
  assert (r1jax.hugepage_env({**base, "GLIBC_TUNABLES": "glibc.malloc.arena_max=2"})
          ["GLIBC_TUNABLES"] == "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1")
  kept = r1jax.hugepage_env({**base, "GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"})
  assert kept["GLIBC_TUNABLES"] == "glibc.malloc.hugetlb=0"
  assert "GLIBC_TUNABLES" not in r1jax.hugepage_env({**base, "R1JAX_HUGEPAGES": "0"})
  code = ("import os, sys, r1jax; print(sys.argv[1:], flush=True); "
          "r1jax.reexec_with_hugepages(); print(os.environ.get('GLIBC_TUNABLES'))")
  out = subprocess.run([sys.executable, "-c", code, "a b"], env=base, capture_output=True,
                       text=True, check=True).stdout.splitlines()
  # Printed once before the restart, then again with the tunable and the same argv.
  assert out == ["['a b']", "['a b']", "glibc.malloc.hugetlb=1"]
  env = _load("local").process_env(base, port=1, n=2, i=0, devices=4)
  assert env["GLIBC_TUNABLES"] == "glibc.malloc.hugetlb=1"
