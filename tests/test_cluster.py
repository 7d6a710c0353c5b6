"""Cluster support (cluster/): one job description rendered for SLURM and Kubernetes; the SLURM scripts run on a
real SLURM (jobs complete, fail, get cancelled: Ray is torn down every time); a Ray cluster of two nodes runs one
job across both; the scripts pass shellcheck, the manifests yamllint and a schema check, the Dockerfile hadolint.

The SLURM tests need `sbatch` and an idle node (as root: .ci/slurm-setup.sh starts one on this machine). Without
them they skip, saying why; with CELLSEG_REQUIRE_SLURM=1 (CI) they fail instead.
"""

from __future__ import annotations

import copy
import json
import os
import re
import secrets
import shlex
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import yaml

from cellseg_batch.run.lock import lock_path
from conftest import REPO, cli

CLUSTER = REPO / "cluster"
RENDER = CLUSTER / "render.py"
VALIDATE = CLUSTER / "k8s" / "validate.py"
JOB_ENV = CLUSTER / "job.env"
SYNTH_ENV = CLUSTER / "examples" / "synthetic.env"
BIN = Path(sys.executable).parent  # the venv's bin: cellseg-batch, ray, shellcheck, yamllint, hadolint
SHELL_SCRIPTS = [CLUSTER / "slurm" / "ray-inference.sbatch", CLUSTER / "slurm" / "train.sbatch",
                 REPO / ".ci" / "slurm-setup.sh", REPO / ".ci" / "run"]  # fmt: skip
TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE",
            "PREEMPTED"}  # fmt: skip


def _tool(name: str) -> str:
    path = BIN / name if (BIN / name).exists() else shutil.which(name)
    if not path:
        pytest.fail(f"{name} is not installed: pip install -e '.[test]'")
    return str(path)


def _render(*args, check: bool = True, env: dict | None = None) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, str(RENDER), *map(str, args)], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=60)  # fmt: skip
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


# -- static checks: scripts, manifests, image recipe -----------------------------------------------------------------


def test_shell_scripts_pass_shellcheck():
    proc = subprocess.run([_tool("shellcheck"), "--severity=info", *map(str, SHELL_SCRIPTS)], capture_output=True,
                          text=True)  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_checked_in_manifests_are_rendered_from_the_job_description(tmp_path):
    _render("k8s", JOB_ENV, "--out", tmp_path)
    for name in ("rayjob.yaml", "train.yaml"):
        assert (tmp_path / name).read_text() == (CLUSTER / "k8s" / name).read_text(), (
            f"cluster/k8s/{name} differs from what cluster/job.env renders: run "
            "`python cluster/render.py k8s cluster/job.env --out cluster/k8s`"
        )


def test_manifests_pass_yamllint_and_the_offline_schema_check(tmp_path):
    _render("k8s", SYNTH_ENV, "--out", tmp_path / "synthetic")
    files = [*sorted((CLUSTER / "k8s").glob("*.yaml")), *sorted((tmp_path / "synthetic").glob("*.yaml"))]
    assert [f.name for f in files] == ["rayjob.yaml", "train.yaml", "rayjob.yaml"]
    lint = subprocess.run([_tool("yamllint"), "--strict", "-c", str(CLUSTER / ".yamllint.yaml"), *map(str, files)],
                          capture_output=True, text=True)  # fmt: skip
    assert lint.returncode == 0, lint.stdout + lint.stderr
    proc = subprocess.run([sys.executable, str(VALIDATE), *map(str, files)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("break_it,message", [
    (lambda d: d["spec"].update(shutdownAfterJobFinish=True), "'shutdownAfterJobFinish' was unexpected"),
    (lambda d: d["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["rayStartParams"].update({"num-cpus": 32}),
     "32 is not of type 'string'"),
    (lambda d: d["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0].update(
        {"volumeMount": []}), "'volumeMount' was unexpected"),
    (lambda d: d["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0][
        "resources"]["limits"].pop("nvidia.com/gpu"), "GPU limit is missing"),
    (lambda d: d["spec"].update(entrypoint=d["spec"]["entrypoint"].replace("--address auto", "")), "--address auto"),
    (lambda d: d["spec"]["rayClusterSpec"]["workerGroupSpecs"][0].pop("groupName"), "'groupName' is a required"),
])  # fmt: skip
def test_the_schema_check_rejects_broken_manifests(tmp_path, break_it, message):
    doc = yaml.safe_load((CLUSTER / "k8s" / "rayjob.yaml").read_text())
    broken = copy.deepcopy(doc)
    break_it(broken)
    (tmp_path / "broken.yaml").write_text(yaml.safe_dump(broken))
    proc = subprocess.run([sys.executable, str(VALIDATE), str(tmp_path / "broken.yaml")], capture_output=True,
                          text=True)  # fmt: skip
    assert proc.returncode == 1 and message in proc.stderr, proc.stderr
    train = list(yaml.safe_load_all((CLUSTER / "k8s" / "train.yaml").read_text()))
    train[1]["spec"]["template"]["spec"]["containers"][0]["comand"] = ["true"]  # a core Job: Kubernetes' schema
    (tmp_path / "train.yaml").write_text(yaml.safe_dump_all(train))
    proc = subprocess.run([sys.executable, str(VALIDATE), str(tmp_path / "train.yaml")], capture_output=True, text=True)
    assert proc.returncode == 1 and "'comand' was unexpected" in proc.stderr, proc.stderr


def test_dockerfile_builds_the_project_on_a_cuda_pytorch_base():
    dockerfile = CLUSTER / "k8s" / "Dockerfile"
    proc = subprocess.run([_tool("hadolint"), "--failure-threshold", "info", str(dockerfile)], capture_output=True,
                          text=True)  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    text = dockerfile.read_text()
    base = re.search(r"ARG BASE_IMAGE=(\S+)", text).group(1)
    assert base.startswith("pytorch/pytorch:") and "cuda" in base
    assert "pip install" in text and "setup_detectron2" in text and "cellseg-batch doctor" in text
    rayjob = yaml.safe_load((CLUSTER / "k8s" / "rayjob.yaml").read_text())
    assert re.search(r"ARG RAY_VERSION=(\S+)", text).group(1) == rayjob["spec"]["rayClusterSpec"]["rayVersion"]


# -- one job description, two back ends ----------------------------------------------------------------------------


def _sbatch_argv(kind: str, *files, sets=()) -> tuple[list[str], list[str]]:
    """(sbatch options, the script's arguments) of the rendered submission."""
    line = _render("slurm" if kind == "run" else "slurm-train", *files, *(a for s in sets for a in ("--set", s)))
    argv = shlex.split(line.stdout)
    while "=" in argv[0] and not argv[0].startswith("-"):  # VAR=value prefixes
        argv.pop(0)
    assert argv[0] == "sbatch"
    script = next(i for i, a in enumerate(argv) if a.endswith(".sbatch"))
    return argv[1:script], argv[script + 1 :]


def test_one_job_description_gives_the_same_job_on_slurm_and_kubernetes():
    run_args = _render("run-args", JOB_ENV).stdout.split("\n")[:-1]
    assert run_args[:3] == ["/shared/em/volume.zarr", "--out", "/shared/results/volume.seg.zarr"]
    assert "--model" in run_args and "--address" not in run_args
    options, script_args = _sbatch_argv("run", JOB_ENV)
    assert script_args == run_args  # SLURM: the script adds only --address (its own Ray head)
    docs = yaml.safe_load((CLUSTER / "k8s" / "rayjob.yaml").read_text())
    assert shlex.split(docs["spec"]["entrypoint"]) == ["cellseg-batch", "run", *run_args, "--address", "auto"]
    # the same resources
    workers = docs["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]
    limits = workers["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert "--nodes=2" in options and workers["replicas"] == 2
    assert "--gres=gpu:4" in options and limits["nvidia.com/gpu"] == "4" and workers["rayStartParams"]["num-gpus"] == "4"
    assert "--cpus-per-task=32" in options and limits["cpu"] == "32" and workers["rayStartParams"]["num-cpus"] == "32"
    assert "--mem=256G" in options and limits["memory"] == "256Gi"
    assert "--time=24:00:00" in options and docs["spec"]["activeDeadlineSeconds"] == 86400
    assert docs["spec"]["shutdownAfterJobFinishes"] is True  # the GPU pods go when the job ends
    # training: the same arguments, rank and rendezvous from each back end
    options, train_args = _sbatch_argv("train", JOB_ENV)
    service, job = yaml.safe_load_all((CLUSTER / "k8s" / "train.yaml").read_text())
    command = job["spec"]["template"]["spec"]["containers"][0]["command"]
    assert command[:2] == ["/bin/sh", "-c"]
    words = shlex.split(command[2])
    assert words[:5] == ["exec", "cellseg-batch", "train", "--num-gpus", "4"]  # SLURM: the GPUs the step got
    # the same, but for the config the template names relative to this repository: SLURM starts the job where sbatch
    # ran, so render.py makes it absolute; the image's working directory is the project
    assert train_args[5] == str(REPO / words[10])
    assert words[5 : 5 + len(train_args)] == [*train_args[:5], words[10], *train_args[6:]]
    assert words[5 + len(train_args) :] == ["--num-machines", "2", "--machine-rank", "$MACHINE_RANK", "--dist-url",
                                            "tcp://cellseg-volume-train-0.cellseg-volume-train.default.svc:29500"]  # fmt: skip
    assert job["spec"]["completionMode"] == "Indexed" and job["spec"]["completions"] == 2
    assert job["spec"]["template"]["spec"]["subdomain"] == service["metadata"]["name"] == "cellseg-volume-train"
    # a site's settings change only the cluster side
    options, script_args = _sbatch_argv("run", JOB_ENV, sets=["PARTITION=a100", "ACCOUNT=lab", "GPU_TYPE=a100"])
    assert {"--partition=a100", "--account=lab", "--gres=gpu:a100:4"} <= set(options) and script_args == run_args


@pytest.mark.parametrize("sets,message", [
    (["NODES=two"], "NODES='two': give a whole number"),
    (["NODSE=2"], "unknown key(s) NODSE"),
    (["RUN_ARGS=--address 10.0.0.1:6379"], "RUN_ARGS: --address comes from its own key or from the cluster"),
    (["MODEL="], "set MODEL"),
    (["TIME_LIMIT=a day"], "TIME_LIMIT='a day'"),
    (["MODEL=", "PREDICTOR=detectorn2"], "PREDICTOR='detectorn2': the built-in ones are detectron2 and labels"),
    (["TIME_LIMIT=25:99:99"], "minutes and seconds go up to 59"),  # SLURM took it as 1-02:41:00
    (["TRAIN_ARGS=--num-gpus 2"], "TRAIN_ARGS: --num-gpus comes from its own key or from the cluster"),
])  # fmt: skip
def test_mistakes_in_the_job_description_are_one_line_errors(sets, message):
    proc = _render("slurm", JOB_ENV, *(a for s in sets for a in ("--set", s)), check=False)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and message in proc.stderr, proc.stderr


def test_slurm_paths_are_made_absolute_and_inputs_missing_here_are_warned_about(tmp_path):
    """The job starts where sbatch ran (relative paths failed there with no folder named); an input this machine
    does not see fails the job only after its wait in the queue; a '#' inside a value is no comment (bash's rule:
    OUT=/r/a#b.zarr was cut to /r/a); a short TIME_LIMIT moves the stop signal (120 s before it stopped a 2-minute
    job at once); a missing SLURM_LOG_DIR is made at submission (else the job fails with no log at all)."""
    (tmp_path / "model").mkdir()
    (tmp_path / "v.tif").write_bytes(b"")
    job = tmp_path / "job.env"
    job.write_text("VOLUME=v.tif\nOUT=results/a#b.zarr  # the second try\nMODEL=model\n"
                   "TRAIN_ANNOTATIONS=train.json\nTRAIN_IMAGES=images\nTRAIN_CONFIG=configs/demo_cpu.yaml\nTRAIN_OUT=m\n")  # fmt: skip
    proc = subprocess.run([sys.executable, str(RENDER), "slurm", str(job), "--set", "TIME_LIMIT=2"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    argv = shlex.split(proc.stdout)
    assert proc.returncode == 0 and argv[argv.index("--out") + 1] == str(tmp_path / "results" / "a#b.zarr")
    assert argv[argv.index("--model") + 1] == str(tmp_path / "model") and str(tmp_path / "v.tif") in argv
    assert "--time=2" in argv and "--signal=B:USR1@30" in argv
    assert proc.stderr.splitlines() == [f"render.py: warning: MODEL={tmp_path / 'model'} holds no cellseg.json: give "
                                        "a model directory `cellseg-batch train` wrote"]  # fmt: skip
    proc = subprocess.run([sys.executable, str(RENDER), "slurm-train", str(job)], cwd=tmp_path, capture_output=True,
                          text=True, timeout=60)  # fmt: skip
    argv = shlex.split(proc.stdout)
    assert argv[argv.index("--config") + 1] == str(REPO / "configs" / "demo_cpu.yaml")  # the template's relative one
    assert not any(a.startswith("--signal") for a in argv)  # no TIME_LIMIT: the script's own
    assert [line.split("=")[0] for line in proc.stderr.splitlines()] == ["render.py: warning: TRAIN_ANNOTATIONS",
                                                                         "render.py: warning: TRAIN_IMAGES"]  # fmt: skip


def test_job_files_as_editors_write_them(tmp_path):
    """A BOM (Windows editors) was refused as part of the first key; a key set twice in one file is said; SLURM's
    lowercase sizes are taken (and made Kubernetes quantities)."""
    job = tmp_path / "job.env"
    job.write_bytes("\ufeffJOB_NAME=t\nNODES=1\nNODES=2\nMEMORY_PER_NODE=16g\n".encode())
    proc = _render("slurm", SYNTH_ENV, job)
    assert "--job-name=t-run" in proc.stdout and "--nodes=2" in proc.stdout and "--mem=16G" in proc.stdout
    assert proc.stderr.strip() == f"render.py: warning: {job}:3: NODES is set again; the last one counts"
    docs = [d for d in yaml.safe_load_all(_render("k8s", SYNTH_ENV, job).stdout) if d]
    rayjob = next(d for d in docs if d["kind"] == "RayJob")
    workers = rayjob["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]
    assert workers["template"]["spec"]["containers"][0]["resources"]["limits"]["memory"] == "16Gi"


def test_kubernetes_paths_outside_the_claim_are_warned_about():
    proc = _render("k8s", JOB_ENV, "--set", "OUT=/scratch/o.zarr")
    assert proc.stderr.strip() == ("render.py: warning: OUT=/scratch/o.zarr is not under DATA_MOUNT=/shared, where the "
                                   "pods see the claim cellseg-data")  # fmt: skip
    proc = _render("k8s", SYNTH_ENV, "--set", "DATA_PVC=")
    assert "DATA_PVC is unset: the pods mount no shared storage for OUT" in proc.stderr
    assert _render("k8s", JOB_ENV).stderr == ""


def test_submitting_makes_the_slurm_log_folder(slurm, tmp_path):
    logs = tmp_path / "logs" / "new"
    job_id = _submit("run", SYNTH_ENV, [*_job_sets(tmp_path, tmp_path / "o.zarr"), f"SLURM_LOG_DIR={logs}"])
    info = _wait_for_end(job_id)
    assert info["JobState"] == "COMPLETED", info
    assert (logs / f"cellseg-synthetic-run-{job_id}.out").exists()


def test_a_job_bigger_than_the_partition_is_refused_not_left_pending(slurm, tmp_path):
    # with SLURM's default EnforcePartLimits=NO, sbatch accepts more nodes than the partition has and the job pends
    # for ever (reason PartitionConfig): the submission says so in one line and cancels it
    nodes = sum(int(n) for n in subprocess.run(["sinfo", "--noheader", "--format=%D"], capture_output=True,
                                               text=True).stdout.split())  # fmt: skip
    sets = [*_job_sets(tmp_path, tmp_path / "o.zarr"), f"NODES={nodes + 1}"]
    proc = _render("slurm", SYNTH_ENV, "--submit", *(a for s in sets for a in ("--set", s)), check=False)
    assert proc.returncode == 2 and proc.stdout == "", proc.stdout + proc.stderr
    line = proc.stderr.strip()
    assert "\n" not in line and "can never start (PartitionConfig; partition " in line, line
    job_id = re.search(r"job (\d+) can never start", line).group(1)
    assert _job_info(job_id).get("JobState") in (None, "CANCELLED"), _job_info(job_id)


# -- SLURM, for real ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def slurm() -> None:
    reason = None
    if not shutil.which("sbatch"):
        reason = "SLURM is not installed (no sbatch); as root run .ci/slurm-setup.sh"
    else:
        proc = subprocess.run(["sinfo", "--noheader", "--format=%T"], capture_output=True, text=True)
        states = proc.stdout.split()
        if proc.returncode != 0 or not {"idle", "mixed"} & set(states):
            reason = f"no idle SLURM node (sinfo: {proc.stderr.strip() or states}); as root run .ci/slurm-setup.sh"
    if reason:
        if os.environ.get("CELLSEG_REQUIRE_SLURM") == "1":
            pytest.fail(f"CELLSEG_REQUIRE_SLURM=1 but {reason}")
        pytest.skip(reason)


def _job_sets(tmp_path: Path, out: Path, **more) -> list[str]:
    cpus = min(2, os.cpu_count() or 1)
    sets = {"OUT": str(out), "SLURM_LOG_DIR": str(tmp_path), "CPUS_PER_NODE": str(cpus), "MEMORY_PER_NODE": "2G",
            "SLURM_SETUP": f"export PATH={shlex.quote(str(BIN))}:$PATH", **more}  # fmt: skip
    return [f"{k}={v}" for k, v in sets.items()]


def _submit(kind: str, job_file: Path, sets: list[str], env: dict | None = None) -> str:
    proc = _render("slurm" if kind == "run" else "slurm-train", job_file, "--submit",
                   *(a for s in sets for a in ("--set", s)), env=env)  # fmt: skip
    job_id = proc.stdout.strip()
    assert job_id.isdigit(), proc.stdout + proc.stderr
    return job_id


def _job_info(job_id: str) -> dict[str, str]:
    out = subprocess.run(["scontrol", "show", "job", "--oneliner", job_id], capture_output=True, text=True).stdout
    return dict(re.findall(r"(\w+)=(\S+)", out))


def _wait_for_end(job_id: str, timeout: float = 240) -> dict[str, str]:
    t = time.monotonic()
    while True:
        info = _job_info(job_id)
        if info.get("JobState") in TERMINAL:
            return info
        if time.monotonic() - t > timeout:
            subprocess.run(["scancel", job_id])
            pytest.fail(f"job {job_id} did not end in {timeout} s: {info.get('JobState')}")
        time.sleep(0.25)


def _job_processes(job_id: str) -> list[str]:
    """Processes left of a SLURM job: its environment names the job (SLURM sets it; Ray's processes inherit it)."""
    found = []
    for p in psutil.process_iter(["pid", "name", "cmdline"]):
        try:
            if p.status() == psutil.STATUS_ZOMBIE:
                continue
            env = p.environ()
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
        if env.get("SLURM_JOB_ID") == job_id or env.get("CELLSEG_RAY_JOB", "").endswith(f"-{job_id}"):
            found.append(f"{p.pid} {p.info['name']}: {' '.join(p.info['cmdline'] or [])[:120]}")
    return found


def _assert_nothing_left(job_id: str, log: str) -> None:
    """The job ended: within 5 s none of its processes lives (left alone, Ray's agents would take a minute)."""
    t = time.monotonic()
    while (left := _job_processes(job_id)) and time.monotonic() - t < 5:
        time.sleep(0.2)
    assert not left, f"job {job_id} left processes behind:\n" + "\n".join(left) + f"\n--- job log:\n{log[-3000:]}"
    assert not Path(f"/tmp/cellseg-ray-{job_id}").exists(), "the job's Ray directory was not removed"


def _log(tmp_path: Path, job_id: str) -> str:
    logs = list(tmp_path.glob(f"*-{job_id}.out"))
    return logs[0].read_text() if logs else ""


def _status(out: Path) -> str | None:
    attrs = out / ".zattrs"
    if not attrs.exists():
        attrs = out / "zarr.json"
    if not attrs.exists():
        return None
    data = json.loads(attrs.read_text())
    return (data.get("attributes", data)).get("cellseg_batch", {}).get("status")


def test_slurm_inference_job_completes_and_leaves_no_ray_process(slurm, tmp_path):
    out = tmp_path / "synthetic.seg.zarr"
    job_id = _submit("run", SYNTH_ENV, _job_sets(tmp_path, out))
    info = _wait_for_end(job_id)
    log = _log(tmp_path, job_id)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", log[-3000:]
    assert "all 1 nodes joined" in log and "--address" in log
    assert "0.6 GiB object store" in log  # 30% of the job's --mem=2G, not of the machine's memory
    report = json.loads((out / "cellseg" / "report.json").read_text())
    assert report["status"] == "complete" and _status(out) == "complete"
    assert report["cluster"]["nodes"] == 1 and report["cluster"]["cpus"] == min(2, os.cpu_count() or 1)
    assert report["config"]["address"] and report["config"]["address"] != "auto"  # joined the job's own head
    assert report["counts"]["objects"] > 0
    _assert_nothing_left(job_id, log)
    # the teardown's kills are no error: no bash "Killed" line, no Ray step ending 137
    assert "Killed" not in log and "exit code 137" not in log and "Ray head ended" not in log, log[-2000:]


def test_a_failing_run_fails_the_job_with_its_status_and_leaves_no_ray_process(slurm, tmp_path):
    out = tmp_path / "bad.seg.zarr"
    job_id = _submit("run", SYNTH_ENV, _job_sets(tmp_path, out, RUN_ARGS="--slices 7:9"))  # the volume has 4
    info = _wait_for_end(job_id)
    log = _log(tmp_path, job_id)
    assert info["JobState"] == "FAILED" and info["ExitCode"] == "2:0", log[-3000:]  # the run's user-error status
    assert "cellseg-batch: error: --slices '7:9' is outside" in log
    _assert_nothing_left(job_id, log)


CANCEL_VOLUME = "synth:16x1024x1024,seed=3"


@pytest.mark.slow  # 90 s; the other SLURM jobs check that no Ray process is left after a job
def test_cancelled_slurm_jobs_tear_down_ray_and_the_run_resumes(slurm, tmp_path):
    out = tmp_path / "big.seg.zarr"
    frag = Path(f"{out}.work") / "frag"
    sets = _job_sets(tmp_path, out, VOLUME=CANCEL_VOLUME, LABELS=CANCEL_VOLUME, BATCH_SIZE="1")

    def slices_done() -> int:
        return len(list(frag.glob("*.npy"))) if frag.exists() else 0

    def wait_for_progress(job_id: str, beyond: int) -> None:
        t = time.monotonic()
        while slices_done() <= beyond:
            info = _job_info(job_id)
            assert info.get("JobState") in ("PENDING", "RUNNING", "CONFIGURING"), (info, _log(tmp_path, job_id))
            assert time.monotonic() - t < 180, "the run made no progress"
            time.sleep(0.05)

    # 1. scancel: every process of the job gets SIGTERM; the script still tears Ray down on every node
    job_id = _submit("run", SYNTH_ENV, sets)
    wait_for_progress(job_id, 0)
    running = _job_processes(job_id)
    assert any("raylet" in p for p in running) and any("gcs_server" in p for p in running), running
    subprocess.run(["scancel", job_id], check=True)
    info = _wait_for_end(job_id)
    log = _log(tmp_path, job_id)
    assert info["JobState"] == "CANCELLED", log[-3000:]
    _assert_nothing_left(job_id, log)
    assert _status(out) == "incomplete" and 1 <= slices_done() < 16
    # a resubmitted job often starts on another node: a lock the cancelled job left there (its driver killed after
    # KillWait) is taken over, since SLURM says that job ended
    cancelled = job_id
    lock_path(out).write_text(json.dumps({"host": "node-17", "pid": 4242, "since": "then", "slurm_job": cancelled}))

    # 2. the graceful stop (what the time limit sends: --signal=B:USR1@120): the run stops cleanly, status 130
    done = slices_done()
    job_id = _submit("run", SYNTH_ENV, sets)
    wait_for_progress(job_id, done)
    subprocess.run(["scancel", "--batch", "--signal=USR1", job_id], check=True)
    info = _wait_for_end(job_id)
    log = _log(tmp_path, job_id)
    assert info["JobState"] == "FAILED" and info["ExitCode"] == "130:0", log[-3000:]
    assert "interrupted; submit the same job again to resume" in log
    assert f"taking over the lock of pid 4242 on node-17 (SLURM job {cancelled}, ended)" in log
    _assert_nothing_left(job_id, log)
    assert _status(out) == "incomplete"

    # 3. the same job again resumes and completes
    job_id = _submit("run", SYNTH_ENV, sets)
    info = _wait_for_end(job_id)
    log = _log(tmp_path, job_id)
    assert info["JobState"] == "COMPLETED", log[-3000:]
    report = json.loads((out / "cellseg" / "report.json").read_text())
    assert report["mode"] == "resume" and _status(out) == "complete"
    assert 0 < report["counts"]["tiles_predicted_now"] < report["counts"]["tiles"]
    done = report["counts"]["tiles"] - report["counts"]["tiles_predicted_now"]
    assert f"already done: predict {done} of {report['counts']['tiles']}" in log  # the log says what was kept
    _assert_nothing_left(job_id, log)


def _tiny_coco(root: Path, n: int = 2, size: int = 96) -> Path:
    """Two grey images with a few labelled disks, COCO polygons: enough for two training iterations."""
    from PIL import Image

    rng = np.random.default_rng(0)
    (root / "images").mkdir(parents=True)
    coco = {"images": [], "annotations": [], "categories": [{"id": 1, "name": "cell"}, {"id": 2, "name": "mito"}]}
    yy, xx = np.ogrid[:size, :size]
    for i in range(n):
        img = np.full((size, size), 200, np.uint8)
        for k in range(4):
            cy, cx, r = (int(v) for v in (rng.integers(16, size - 16), rng.integers(16, size - 16), rng.integers(6, 12)))
            img[(yy - cy) ** 2 + (xx - cx) ** 2 <= r * r] = 60 + 60 * (k % 2)
            poly = [v for a in np.linspace(0, 2 * np.pi, 12, endpoint=False)
                    for v in (float(cx + r * np.cos(a)), float(cy + r * np.sin(a)))]  # fmt: skip
            coco["annotations"].append({"id": len(coco["annotations"]) + 1, "image_id": i + 1, "iscrowd": 0,
                                        "category_id": 1 + k % 2, "segmentation": [poly],
                                        "bbox": [cx - r, cy - r, 2 * r, 2 * r], "area": float(np.pi * r * r)})  # fmt: skip
        Image.fromarray(np.repeat(img[:, :, None], 3, axis=2)).save(root / "images" / f"s{i}.png")
        coco["images"].append({"id": i + 1, "file_name": f"s{i}.png", "width": size, "height": size})
    (root / "ann.json").write_text(json.dumps(coco))
    return root / "ann.json"


def test_slurm_training_job_takes_rank_and_rendezvous_from_slurm(slurm, tmp_path):
    ann = _tiny_coco(tmp_path / "coco")
    model = tmp_path / "model"
    sets = _job_sets(tmp_path, tmp_path / "unused.zarr", TRAIN_ANNOTATIONS=ann, TRAIN_IMAGES=tmp_path / "coco" / "images",
                     TRAIN_CONFIG=REPO / "configs" / "demo_cpu.yaml", TRAIN_OUT=model,
                     TRAIN_ARGS="--max-iter 2 --batch-size 2")  # fmt: skip
    # two gloo processes on the node: they meet at the job's rendezvous address (world size 2)
    job_id = _submit("train", JOB_ENV, [*sets, "NODES=1", "GPUS_PER_NODE=0", "PARTITION=", "TIME_LIMIT=15"],
                     env={"CELLSEG_CPU_PROCS": "2"})  # fmt: skip
    info = _wait_for_end(job_id)
    log = _log(tmp_path, job_id)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", log[-3000:]
    host = subprocess.run(["scontrol", "show", "hostnames", info["NodeList"]], capture_output=True, text=True)
    assert re.search(rf"rendezvous tcp://{re.escape(host.stdout.split()[0])}:\d+", log), log[:2000]
    assert "machine rank 0 of 1, --cpu-procs 2" in log
    assert (model / "model_final.pth").exists() and (model / "train" / "log.txt.rank1").exists()
    assert json.loads((model / "cellseg.json").read_text())["training"]["iterations"] == 2
    _assert_nothing_left(job_id, log)


def test_the_time_limit_warning_stops_a_slurm_training_job_with_a_checkpoint(slurm, tmp_path):
    """--signal=B:USR1@300 (what scancel --batch --signal=USR1 sends): the job script passes USR1 to the training
    process, which stops with a checkpoint and the model directory; the job ends 130. It sent srun SIGTERM, which
    killed the training with no checkpoint (exit 137)."""
    ann = _tiny_coco(tmp_path / "coco")
    model = tmp_path / "model"
    sets = _job_sets(tmp_path, tmp_path / "unused.zarr", TRAIN_ANNOTATIONS=ann, TRAIN_IMAGES=tmp_path / "coco" / "images",
                     TRAIN_CONFIG=REPO / "configs" / "demo_cpu.yaml", TRAIN_OUT=model,
                     TRAIN_ARGS="--max-iter 100000 --batch-size 2 SOLVER.CHECKPOINT_PERIOD 100000")  # fmt: skip
    job_id = _submit("train", JOB_ENV, [*sets, "NODES=1", "GPUS_PER_NODE=0", "PARTITION=", "TIME_LIMIT=15"])
    metrics, t = model / "train" / "metrics.json", time.monotonic()
    while not (metrics.exists() and metrics.read_text().count("\n") >= 1):  # a line every 20 iterations
        assert _job_info(job_id).get("JobState") in ("PENDING", "RUNNING", "CONFIGURING"), _log(tmp_path, job_id)
        assert time.monotonic() - t < 180, "the training made no progress"
        time.sleep(0.2)
    subprocess.run(["scancel", "--batch", "--signal=USR1", job_id], check=True)
    info = _wait_for_end(job_id)
    log = _log(tmp_path, job_id)
    assert info["JobState"] == "FAILED" and info["ExitCode"] == "130:0", log[-3000:]
    stopped = json.loads((model / "cellseg.json").read_text())["training"]
    assert stopped["stopped_by_signal"] == "SIGUSR1" and stopped["last_iter"] > 20
    assert f"training stopped at iteration {stopped['last_iter']}, its checkpoint saved" in log
    assert (model / "train" / "last_checkpoint").read_text().strip() == "model_final.pth"
    _assert_nothing_left(job_id, log)


# -- two Ray nodes on one machine ------------------------------------------------------------------------------------


def _free_port_block() -> int:
    """The first of 100 ports, all free now (the cluster scripts give each Ray node such a block)."""
    rng = np.random.default_rng()
    for _ in range(50):
        base = int(rng.integers(330, 600)) * 100  # 33000-59999, away from the SLURM jobs' blocks
        try:
            for port in (base, base + 1, *range(base + 2, base + 8)):
                with socket.socket() as s:
                    s.bind(("", port))
            return base
        except OSError:
            continue
    pytest.fail("no free block of ports")


def _ray_start(tag: str, env: dict, base: int, *args) -> None:
    ports = [f"--dashboard-agent-listen-port={base + 2}", f"--dashboard-agent-grpc-port={base + 3}",
             f"--metrics-export-port={base + 4}", f"--runtime-env-agent-port={base + 5}",
             f"--node-manager-port={base + 6}", f"--object-manager-port={base + 7}", f"--min-worker-port={base + 20}",
             f"--max-worker-port={base + 99}"]  # fmt: skip
    proc = subprocess.run([str(BIN / "ray"), "start", *args, *ports, "--disable-usage-stats"], capture_output=True,
                          text=True, env={**env, "CELLSEG_RAY_JOB": tag}, timeout=120)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]


def _kill_tagged(tag: str) -> list[int]:
    """Kill this test's Ray (its processes carry CELLSEG_RAY_JOB=tag); `ray stop` would end every Ray here."""
    killed = []
    for _ in range(50):
        pids = []
        for p in psutil.process_iter():
            try:
                if p.environ().get("CELLSEG_RAY_JOB") == tag and p.status() != psutil.STATUS_ZOMBIE:
                    pids.append(p)
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue
        if not pids:
            return killed
        for p in pids:
            try:
                p.kill()
                killed.append(p.pid)
            except psutil.NoSuchProcess:
                pass
        time.sleep(0.2)
    pytest.fail(f"could not stop Ray processes {pids}")


def test_two_ray_nodes_run_one_job_across_both(tmp_path):
    tag = f"pytest-{os.getpid()}-{secrets.token_hex(4)}"
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32),
           "RAY_USAGE_STATS_ENABLED": "0"}  # fmt: skip
    temp = Path(f"/tmp/cellseg-pytest-{secrets.token_hex(3)}")  # short: Ray's socket paths must fit
    head_port, node_port = _free_port_block(), _free_port_block()
    try:
        # a head with 1 CPU and a second node with 1 CPU and a resource of its own
        _ray_start(tag, env, head_port, "--head", f"--port={head_port}", "--num-cpus=1", f"--temp-dir={temp}",
                   "--include-dashboard=false", f"--dashboard-port={head_port + 8}",
                   f"--ray-client-server-port={head_port + 1}")  # fmt: skip
        address = (temp / "ray_current_cluster").read_text().strip()
        _ray_start(tag, env, node_port, f"--address={address}", "--num-cpus=1", '--resources={"node2": 1}')
        out = tmp_path / "two.seg.zarr"
        volume = "synth:4x384x384,seed=2"
        # two actors of one CPU each: one per node, as neither node has two CPUs
        cli("run", volume, "--predictor", "labels", "--labels", volume, "--tile", 128, "--overlap", 16, "--batch-size",
            1, "--actors", 2, "--cpus-per-actor", 1, "--address", address, "--out", out, "--no-progress", env=env)  # fmt: skip
        report = json.loads((out / "cellseg" / "report.json").read_text())
        assert report["status"] == "complete" and _status(out) == "complete"
        assert {k: report["cluster"][k] for k in ("cpus", "gpus", "nodes", "max_node_cpus")} == {
            "cpus": 2, "gpus": 0, "nodes": 2, "max_node_cpus": 1}  # fmt: skip
        assert report["counts"]["actors"] == {"count": 2, "cpus_each": 1, "gpus_each": 0}
        # where the predictor actors ran, from the cluster's own records (GCS keeps dead actors)
        probe = subprocess.run([sys.executable, "-c", (
            "import json, sys, ray\n"
            "ray.init(address=sys.argv[1], logging_level='ERROR', log_to_driver=False)\n"
            "from ray._private import state\n"
            "actors = [a for a in state.actors().values() if a['ActorClassName'] == 'PredictorWorker']\n"
            "nodes = {n['NodeID']: n['Resources'] for n in ray.nodes()}\n"
            "print(json.dumps([sorted(nodes[a['Address']['NodeID']]) for a in actors]))\n"
        ), address], capture_output=True, text=True, env=env, timeout=120)  # fmt: skip
        assert probe.returncode == 0, probe.stderr[-2000:]
        placed = json.loads(probe.stdout.strip().splitlines()[-1])
        assert len(placed) == 2, placed
        assert sorted("node2" in resources for resources in placed) == [False, True], placed  # one on each node
    finally:
        killed = _kill_tagged(tag)
        shutil.rmtree(temp, ignore_errors=True)
    assert killed, "no Ray process carried the tag: the cleanup above would not have found them"
