#!/usr/bin/env python3
"""One job description (cluster/job.env) -> the SLURM submission and the Kubernetes (KubeRay) manifests.

    python cluster/render.py check     JOB.env [MORE.env ...] [--set KEY=VALUE ...]   # validate, show the settings
    python cluster/render.py run-args  JOB.env                 # the `cellseg-batch run` arguments, one per line
    python cluster/render.py slurm     JOB.env [--submit]      # the sbatch command for the inference job
    python cluster/render.py slurm-train JOB.env [--submit]    # the sbatch command for the training job
    python cluster/render.py k8s       JOB.env [--out DIR]     # RayJob and training Job manifests (YAML)

Files are read in order, later keys win, then --set; e.g. `render.py slurm site.env job.env --set OUT=/x.zarr`.
Both back ends get the same `cellseg-batch run`/`train` arguments from the same keys: only how the cluster is
made differs (SLURM: cluster/slurm/*.sbatch start Ray/torch across the allocation; Kubernetes: KubeRay and an
indexed Job). A mistake in the file ends in one line on stderr and exit status 2. For SLURM, which runs the job
on the filesystem this machine sees, relative paths are made absolute (against this folder, where sbatch starts the
job) and each input not found here is warned about.
"""

from __future__ import annotations

import argparse
import glob
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
INFER_SCRIPT = HERE / "slurm" / "ray-inference.sbatch"
TRAIN_SCRIPT = HERE / "slurm" / "train.sbatch"

# every key a job file may set, with its default ("" = unset)
DEFAULTS: dict[str, str] = {
    "JOB_NAME": "cellseg",
    "VOLUME": "", "OUT": "", "MODEL": "", "PREDICTOR": "", "LABELS": "", "CLASSES": "",
    "TILE": "", "OVERLAP": "", "BATCH_SIZE": "", "ACTORS": "", "CPUS_PER_ACTOR": "", "RUN_ARGS": "",
    "NODES": "1", "GPUS_PER_NODE": "0", "CPUS_PER_NODE": "1", "MEMORY_PER_NODE": "", "TIME_LIMIT": "",
    "TRAIN_ANNOTATIONS": "", "TRAIN_IMAGES": "", "TRAIN_CONFIG": "", "TRAIN_OUT": "", "TRAIN_ARGS": "",
    "TRAIN_PORT": "",
    "PARTITION": "", "ACCOUNT": "", "GPU_TYPE": "", "SLURM_SETUP": "", "SLURM_LOG_DIR": "", "SLURM_ARGS": "",
    "NAMESPACE": "default", "IMAGE": "", "IMAGE_PULL_SECRET": "", "RAY_VERSION": "", "DATA_PVC": "",
    "DATA_MOUNT": "/shared", "GPU_RESOURCE": "nvidia.com/gpu", "GPU_NODE_SELECTOR": "", "HEAD_CPUS": "2",
    "HEAD_MEMORY": "8G",
}  # fmt: skip
INTS = {"TILE": 1, "OVERLAP": 0, "BATCH_SIZE": 1, "ACTORS": 1, "CPUS_PER_ACTOR": 1, "NODES": 1, "GPUS_PER_NODE": 0,
        "CPUS_PER_NODE": 1, "TRAIN_PORT": 1, "HEAD_CPUS": 1}  # fmt: skip
# options the cluster scripts set themselves
RESERVED_RUN = ("--address", "--out", "--model", "--predictor", "--labels", "--classes")
RESERVED_TRAIN = ("--num-machines", "--machine-rank", "--dist-url", "--train", "--images", "--config", "--out",
                  "--num-gpus", "--cpu-procs")  # the processes per node: from the GPUs each node got
TRAIN_DEFAULT_PORT = 29500
PREDICTORS = ("detectron2", "labels")  # built in; a lab's own is MODULE:NAME
# keys that hold paths; of them, what the job reads (by kind of job)
PATH_KEYS = ("VOLUME", "OUT", "MODEL", "LABELS", "CLASSES", "TRAIN_ANNOTATIONS", "TRAIN_IMAGES", "TRAIN_CONFIG",
             "TRAIN_OUT", "SLURM_LOG_DIR")  # fmt: skip
INPUT_KEYS = {"run": ("VOLUME", "MODEL", "LABELS", "CLASSES"),
              "train": ("TRAIN_ANNOTATIONS", "TRAIN_IMAGES", "TRAIN_CONFIG")}  # fmt: skip
# seconds before the time limit that the scripts' --signal=B:USR1@N stops the job cleanly
STOP_LEAD = {"run": 120, "train": 300}


class JobError(Exception):
    """A mistake in the job description: one line for the user."""


class Job:
    """The settings of one job, validated; ``run_args()``/``train_args()`` are what both back ends run."""

    def __init__(self, values: dict[str, str]):
        self.v = dict(DEFAULTS)
        self.v.update(values)
        self._check()

    def __getitem__(self, key: str) -> str:
        return self.v[key]

    def number(self, key: str) -> int | None:
        return int(self.v[key]) if self.v[key] else None

    def _check(self) -> None:
        v = self.v
        for key, low in INTS.items():
            if v[key] and not (re.fullmatch(r"\d+", v[key]) and int(v[key]) >= low):
                raise JobError(f"{key}={v[key]!r}: give a whole number >= {low}")
        if not re.fullmatch(r"[a-z0-9]([-a-z0-9]{0,38}[a-z0-9])?", v["JOB_NAME"]):
            raise JobError(f"JOB_NAME={v['JOB_NAME']!r}: use 1-40 lowercase letters, digits and '-' (a Kubernetes name)")
        for key in ("MEMORY_PER_NODE", "HEAD_MEMORY"):
            if v[key] and not re.fullmatch(r"\d+[KMGTkmgt]?", v[key]):
                raise JobError(f"{key}={v[key]!r}: give a size like 64G, 512M (SLURM units)")
            v[key] = v[key].upper()  # SLURM takes 16g too; Kubernetes' quantities need the capital
        if v["TIME_LIMIT"]:
            time_seconds(v["TIME_LIMIT"])
        if v["GPU_NODE_SELECTOR"] and "=" not in v["GPU_NODE_SELECTOR"]:
            raise JobError(f"GPU_NODE_SELECTOR={v['GPU_NODE_SELECTOR']!r}: give LABEL=VALUE")
        for key, reserved in (("RUN_ARGS", RESERVED_RUN), ("TRAIN_ARGS", RESERVED_TRAIN)):
            for word in split(key, v[key]):
                if word.split("=")[0] in reserved:
                    raise JobError(f"{key}: {word.split('=')[0]} comes from its own key or from the cluster; remove it")
        for key in ("SLURM_ARGS",):
            split(key, v[key])

    # -- what runs ----------------------------------------------------------------------------------------------
    def run_args(self) -> list[str]:
        """``cellseg-batch run`` arguments (without --address: each back end adds its own)."""
        v = self.v
        if not v["VOLUME"] or not v["OUT"]:
            raise JobError("the job needs VOLUME and OUT")
        args = [v["VOLUME"], "--out", v["OUT"]]
        predictor = v["PREDICTOR"] or "detectron2"
        if predictor == "detectron2":
            if not v["MODEL"]:
                raise JobError("set MODEL (a model directory), or PREDICTOR=labels with LABELS")
            if v["LABELS"]:
                raise JobError("LABELS is for PREDICTOR=labels")
            args += ["--model", v["MODEL"]]
        else:
            if predictor not in PREDICTORS and ":" not in predictor:
                raise JobError(f"PREDICTOR={predictor!r}: the built-in ones are {' and '.join(PREDICTORS)}; a lab's "
                               "own is MODULE:NAME")  # fmt: skip
            args += ["--predictor", predictor]
            if predictor == "labels" and not v["LABELS"]:
                raise JobError("PREDICTOR=labels needs LABELS")
            if v["MODEL"]:
                raise JobError(f"MODEL is for the detectron2 predictor, not PREDICTOR={predictor}")
        if v["LABELS"]:
            args += ["--labels", v["LABELS"]]
        if v["CLASSES"]:
            args += ["--classes", v["CLASSES"]]
        for key, option in (("TILE", "--tile"), ("OVERLAP", "--overlap"), ("BATCH_SIZE", "--batch-size"),
                            ("ACTORS", "--actors"), ("CPUS_PER_ACTOR", "--cpus-per-actor")):  # fmt: skip
            if v[key]:
                args += [option, v[key]]
        return args + split("RUN_ARGS", v["RUN_ARGS"])

    def train_args(self) -> list[str]:
        """``cellseg-batch train`` arguments, without processes, rank and address (each back end adds its own:
        SLURM from the GPUs the step got, Kubernetes from GPUS_PER_NODE)."""
        v = self.v
        missing = [k for k in ("TRAIN_ANNOTATIONS", "TRAIN_IMAGES", "TRAIN_CONFIG", "TRAIN_OUT") if not v[k]]
        if missing:
            raise JobError(f"the training job needs {', '.join(missing)}")
        args = ["--train", v["TRAIN_ANNOTATIONS"], "--images", v["TRAIN_IMAGES"], "--config", v["TRAIN_CONFIG"],
                "--out", v["TRAIN_OUT"]]  # fmt: skip
        return args + split("TRAIN_ARGS", v["TRAIN_ARGS"])

    @property
    def has_training(self) -> bool:
        return bool(self.v["TRAIN_ANNOTATIONS"])


def split(key: str, text: str) -> list[str]:
    try:
        return shlex.split(text)
    except ValueError as e:
        raise JobError(f"{key}: {e}") from None


def time_seconds(text: str) -> int:
    """SLURM's time formats: M, M:S, H:M:S, D-H, D-H:M, D-H:M:S."""
    m = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", text)
    if not m:
        raise JobError(f"TIME_LIMIT={text!r}: give [D-]HH:MM:SS")
    days, a, b, c = m.groups()
    if days is not None:  # D-H, D-H:M, D-H:M:S
        h, mi, s = int(a), int(b or 0), int(c or 0)
    elif c is not None:  # H:M:S
        h, mi, s = int(a), int(b), int(c)
    elif b is not None:  # M:S
        h, mi, s = 0, int(a), int(b)
    else:  # M
        h, mi, s = 0, int(a), 0
    # the leading field may be large (90 minutes, 36 hours); the ones after a colon are clock fields
    if (b is not None and mi >= 60 and (days is not None or c is not None)) or (s >= 60 and (b or c) is not None):
        raise JobError(f"TIME_LIMIT={text!r}: minutes and seconds go up to 59; give [D-]HH:MM:SS")
    total = ((int(days or 0) * 24 + h) * 60 + mi) * 60 + s
    if total <= 0:
        raise JobError(f"TIME_LIMIT={text!r} must be positive")
    return total


def _is_path(key: str, value: str) -> bool:
    """Whether a path key's value names a file here (not synth:..., a URL, inline JSON or a class name)."""
    if not value or "://" in value or value.startswith(("synth:", "{")):
        return False
    return value.lower().endswith(".json") if key == "CLASSES" else True


def _found_here(path: str) -> bool:
    """A path, a file pattern (slice_*.tif), or a dataset in a container file (x.h5/raw, x.n5/s0, x.tif:1)."""
    if os.path.exists(path) or (glob.has_magic(path) and glob.glob(path)):
        return True
    container = re.match(r"(.+?\.(?:h5|hdf5|hdf|n5|zarr|tiff?))[/:]", path, re.IGNORECASE)
    return bool(container and os.path.exists(container.group(1)))


def for_slurm(job: Job, kinds: tuple[str, ...]) -> list[str]:
    """The job's paths as SLURM's nodes will use them, seen from this machine (the submitting one, on the cluster's
    shared filesystem): relative ones made absolute against this folder, where sbatch starts the job (TRAIN_CONFIG
    also against this repository, whose configs/ the template names); returns a warning for each input not found
    here, which would fail the job only after it waited in the queue."""
    v = job.v
    for key in PATH_KEYS:
        if _is_path(key, v[key]) and not os.path.isabs(v[key]):
            here = Path.cwd() / v[key]
            if key == "TRAIN_CONFIG" and not here.exists() and (HERE.parent / v[key]).exists():
                here = HERE.parent / v[key]
            v[key] = str(here)
    warnings = []
    for key in (k for kind in kinds for k in INPUT_KEYS[kind]):
        if _is_path(key, v[key]) and not _found_here(v[key]):
            warnings.append(f"{key}={v[key]} is not found on this machine: the job fails unless its nodes see it")
        elif key == "MODEL" and v[key] and not (Path(v[key]) / "cellseg.json").exists():
            warnings.append(f"MODEL={v[key]} holds no cellseg.json: give a model directory `cellseg-batch train` wrote")
    return warnings


def _bash_comment(raw: str) -> int:
    """Where a comment starts in a value as bash reads it: a '#' that begins a word, outside quotes (shlex's
    comments also start inside a word, which cut OUT=/results/a#b.zarr to /results/a)."""
    quote = None
    for i, ch in enumerate(raw):
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or raw[i - 1].isspace()):
            return i
    return len(raw)


def parse_env(path: Path) -> dict[str, str]:
    """KEY=VALUE lines; '#' comments; a value may be quoted; nothing is expanded."""
    values: dict[str, str] = {}
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()  # -sig: a BOM some Windows editors write
    except OSError as e:
        raise JobError(f"cannot read {path}: {e.strerror}") from None
    for n, line in enumerate(lines, 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        m = re.fullmatch(r"([A-Z][A-Z0-9_]*)=(.*)", line)
        if not m:
            raise JobError(f"{path}:{n}: expected KEY=VALUE, got {line!r}")
        key, raw = m.groups()
        try:
            words = shlex.split(raw[: _bash_comment(raw)])
        except ValueError as e:
            raise JobError(f"{path}:{n}: {key}: {e}") from None
        if len(words) > 1:
            raise JobError(f"{path}:{n}: {key}: quote a value that has spaces")
        if key in values:
            print(f"render.py: warning: {path}:{n}: {key} is set again; the last one counts", file=sys.stderr)
        values[key] = words[0] if words else ""
    return values


def load(paths: list[str], sets: list[str]) -> Job:
    values: dict[str, str] = {}
    for p in paths:
        values.update(parse_env(Path(p)))
    for item in sets:
        key, eq, value = item.partition("=")
        if not eq:
            raise JobError(f"--set {item!r}: give KEY=VALUE")
        values[key] = value
    unknown = sorted(set(values) - set(DEFAULTS))
    if unknown:
        raise JobError(f"unknown key(s) {', '.join(unknown)}; the keys are listed in cluster/job.env")
    return Job(values)


# -- SLURM ----------------------------------------------------------------------------------------------------------


def sbatch_options(job: Job, kind: str) -> list[str]:
    gpus = job.number("GPUS_PER_NODE") or 0
    log_dir = job["SLURM_LOG_DIR"]
    log = f"{job['JOB_NAME']}-{kind}-%j.out"
    opts = [f"--job-name={job['JOB_NAME']}-{kind}", f"--nodes={job['NODES']}", "--ntasks-per-node=1",
            f"--cpus-per-task={job['CPUS_PER_NODE']}", f"--output={os.path.join(log_dir, log) if log_dir else log}"]  # fmt: skip
    if job["MEMORY_PER_NODE"]:
        opts.append(f"--mem={job['MEMORY_PER_NODE']}")
    if gpus:
        opts.append(f"--gres=gpu:{job['GPU_TYPE'] + ':' if job['GPU_TYPE'] else ''}{gpus}")
    for key, option in (("PARTITION", "--partition"), ("ACCOUNT", "--account"), ("TIME_LIMIT", "--time")):
        if job[key]:
            opts.append(f"{option}={job[key]}")
    if job["TIME_LIMIT"] and 4 * STOP_LEAD[kind] > (limit := time_seconds(job["TIME_LIMIT"])):
        # the script's stop signal would come early in a short job (SLURM sends it up to 60 s earlier still)
        opts.append(f"--signal=B:USR1@{max(10, limit // 4)}")
    return opts + split("SLURM_ARGS", job["SLURM_ARGS"])


def sbatch_command(job: Job, kind: str) -> tuple[list[str], dict[str, str]]:
    """(argv, extra environment) of the submission."""
    if kind == "run":
        argv = ["sbatch", *sbatch_options(job, "run"), str(INFER_SCRIPT), *job.run_args()]
    else:
        argv = ["sbatch", *sbatch_options(job, "train"), str(TRAIN_SCRIPT), *job.train_args()]
    env = {}
    if job["SLURM_SETUP"]:
        env["CELLSEG_SETUP"] = job["SLURM_SETUP"]
    if kind == "train" and job["TRAIN_PORT"]:
        env["CELLSEG_TRAIN_PORT"] = job["TRAIN_PORT"]
    return argv, env


def submit(argv: list[str], env: dict[str, str]) -> int:
    proc = subprocess.run([argv[0], "--parsable", *argv[1:]], env={**os.environ, **env}, capture_output=True,
                          text=True)  # fmt: skip
    if proc.returncode != 0:
        print(proc.stderr.strip() or f"sbatch failed ({proc.returncode})", file=sys.stderr)
        return proc.returncode
    job_id = proc.stdout.strip().split(";")[0]
    if reason := never_starts(job_id):
        subprocess.run(["scancel", job_id], capture_output=True)
        raise JobError(f"job {job_id} can never start ({reason}), so it was cancelled: ask for what the partition has "
                       f"(NODES, CPUS_PER_NODE, MEMORY_PER_NODE, TIME_LIMIT, PARTITION, ACCOUNT)")
    print(job_id)
    return 0


# why SLURM holds a job that waiting will not start: the request exceeds the partition, or the account/QOS is wrong
# (with EnforcePartLimits=NO, the default, sbatch accepts such a job and it pends for ever)
NEVER_STARTS = re.compile(r"^(PartitionConfig|PartitionNodeLimit|PartitionTimeLimit|BadConstraints|InvalidAccount|"
                          r"InvalidQOS|AccountNotAllowed|QOSNotAllowed|(Assoc|QOS)Max\w*PerJob\w*)$")


def never_starts(job_id: str, wait: float = 3.0) -> str | None:
    """The pending reason of a job that can never start (with the partition's sizes), or None. SLURM gives a reason
    at its first scheduling pass, right after the submission: asked for up to ``wait`` seconds until it has one."""
    deadline = time.monotonic() + wait
    while True:
        proc = subprocess.run(["squeue", "--noheader", "--jobs", job_id, "--format=%T %r %P"], capture_output=True,
                              text=True)  # fmt: skip
        state, reason, partition = (proc.stdout.split() + ["", "", ""])[:3]
        if state != "PENDING" or reason not in ("None", "") or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    if state != "PENDING" or not NEVER_STARTS.match(reason):
        return None
    sizes = subprocess.run(["sinfo", "--noheader", "--partition", partition,
                            "--format=%D nodes, %c CPUs and %m MB per node, time limit %l"],
                           capture_output=True, text=True).stdout.split("\n")[0].strip()  # fmt: skip
    return f"{reason}; partition {partition}: {sizes}" if sizes else reason


# -- Kubernetes -----------------------------------------------------------------------------------------------------


def k8s_quantity(size: str) -> str:
    """SLURM size (MB by default, K/M/G/T binary) -> Kubernetes quantity."""
    return size[:-1] + size[-1] + "i" if size[-1] in "KMGT" else size + "Mi"


def _labels(job: Job, component: str) -> dict:
    return {"app.kubernetes.io/name": "cellseg-batch", "app.kubernetes.io/instance": job["JOB_NAME"],
            "app.kubernetes.io/component": component}  # fmt: skip


def for_k8s(job: Job) -> list[str]:
    """Warnings for paths the pods cannot see: outside DATA_MOUNT (the claim's mount), or any path without a claim."""
    used = [k for k in PATH_KEYS if k not in ("SLURM_LOG_DIR", "CLASSES") and _is_path(k, job[k])]
    used += ["CLASSES"] if _is_path("CLASSES", job["CLASSES"]) else []
    if not job["DATA_PVC"]:
        return [f"DATA_PVC is unset: the pods mount no shared storage for {', '.join(used)} (set DATA_PVC, or add "
                "a volume to the manifests by hand)"] if used else []  # fmt: skip
    mount = job["DATA_MOUNT"].rstrip("/") + "/"
    return [f"{k}={job[k]} is not under DATA_MOUNT={job['DATA_MOUNT']}, where the pods see the claim {job['DATA_PVC']}"
            for k in used if os.path.isabs(job[k]) and not job[k].startswith(mount)]


def _volumes(job: Job) -> tuple[list, list]:
    volumes = [{"name": "dshm", "emptyDir": {"medium": "Memory"}}]  # Ray's object store and torch workers
    mounts = [{"name": "dshm", "mountPath": "/dev/shm"}]
    if job["DATA_PVC"]:
        volumes.append({"name": "data", "persistentVolumeClaim": {"claimName": job["DATA_PVC"]}})
        mounts.append({"name": "data", "mountPath": job["DATA_MOUNT"]})
    return volumes, mounts


def _resources(cpus: int, memory: str, gpus: int, gpu_resource: str) -> dict:
    amounts = {"cpu": str(cpus)}
    if memory:
        amounts["memory"] = k8s_quantity(memory)
    if gpus:
        amounts[gpu_resource] = str(gpus)
    return {"requests": dict(amounts), "limits": dict(amounts)}


def _pod_spec(job: Job, container: dict, gpus: int, volumes: list) -> dict:
    spec: dict = {"containers": [container], "volumes": volumes}
    if job["IMAGE_PULL_SECRET"]:
        spec["imagePullSecrets"] = [{"name": job["IMAGE_PULL_SECRET"]}]
    if gpus:
        if job["GPU_NODE_SELECTOR"]:
            key, _, value = job["GPU_NODE_SELECTOR"].partition("=")
            spec["nodeSelector"] = {key: value}
        spec["tolerations"] = [{"key": job["GPU_RESOURCE"], "operator": "Exists", "effect": "NoSchedule"}]
    return spec


def rayjob(job: Job) -> dict:
    """A KubeRay RayJob: a head (the driver; no tasks on it) and NODES GPU workers; deleted when the job ends."""
    if not job["IMAGE"]:
        raise JobError("set IMAGE (the image built from cluster/k8s/Dockerfile)")
    gpus, cpus = job.number("GPUS_PER_NODE") or 0, job.number("CPUS_PER_NODE")
    volumes, mounts = _volumes(job)
    env = [{"name": "RAY_USAGE_STATS_ENABLED", "value": "0"}]
    head = {"name": "ray-head", "image": job["IMAGE"], "env": env, "volumeMounts": mounts,
            "resources": _resources(job.number("HEAD_CPUS"), job["HEAD_MEMORY"], 0, job["GPU_RESOURCE"]),
            "ports": [{"containerPort": 6379, "name": "gcs"}, {"containerPort": 8265, "name": "dashboard"},
                      {"containerPort": 10001, "name": "client"}]}  # fmt: skip
    worker = {"name": "ray-worker", "image": job["IMAGE"], "env": env, "volumeMounts": mounts,
              "resources": _resources(cpus, job["MEMORY_PER_NODE"], gpus, job["GPU_RESOURCE"])}  # fmt: skip
    nodes = job.number("NODES")
    spec: dict = {
        "entrypoint": shlex.join(["cellseg-batch", "run", *job.run_args(), "--address", "auto"]),
        "shutdownAfterJobFinishes": True,  # success, failure or deletion: the cluster goes, no idle GPU pods
        "ttlSecondsAfterFinished": 600,
        "rayClusterSpec": {
            "headGroupSpec": {
                "rayStartParams": {"num-cpus": "0", "dashboard-host": "0.0.0.0"},  # tasks and actors on workers
                "template": {"metadata": {"labels": _labels(job, "ray-head")},
                             "spec": _pod_spec(job, head, 0, volumes)},
            },
            "workerGroupSpecs": [{
                "groupName": "gpu-workers" if gpus else "workers",
                "replicas": nodes, "minReplicas": nodes, "maxReplicas": nodes,
                "rayStartParams": {"num-cpus": str(cpus), "num-gpus": str(gpus)},
                "template": {"metadata": {"labels": _labels(job, "ray-worker")},
                             "spec": _pod_spec(job, worker, gpus, volumes)},
            }],
        },
    }  # fmt: skip
    if job["RAY_VERSION"]:
        spec["rayClusterSpec"] = {"rayVersion": job["RAY_VERSION"], **spec["rayClusterSpec"]}
    if job["TIME_LIMIT"]:
        spec["activeDeadlineSeconds"] = time_seconds(job["TIME_LIMIT"])
    return {"apiVersion": "ray.io/v1", "kind": "RayJob",
            "metadata": {"name": job["JOB_NAME"], "namespace": job["NAMESPACE"], "labels": _labels(job, "inference")},
            "spec": spec}  # fmt: skip


def training(job: Job) -> list[dict]:
    """An indexed Job (one pod per node, rank = completion index) and the headless Service that names pod 0."""
    if not job["IMAGE"]:
        raise JobError("set IMAGE (the image built from cluster/k8s/Dockerfile)")
    name = f"{job['JOB_NAME']}-train"
    nodes, gpus, cpus = job.number("NODES"), job.number("GPUS_PER_NODE") or 0, job.number("CPUS_PER_NODE")
    port = job.number("TRAIN_PORT") or TRAIN_DEFAULT_PORT
    dist_url = f"tcp://{name}-0.{name}.{job['NAMESPACE']}.svc:{port}"
    procs = ["--num-gpus", str(gpus)] if gpus else ["--cpu-procs", "1"]
    command = (f"exec cellseg-batch train {shlex.join([*procs, *job.train_args()])} --num-machines {nodes} "
               f'--machine-rank "$MACHINE_RANK" --dist-url {shlex.quote(dist_url)}')  # fmt: skip
    volumes, mounts = _volumes(job)
    container = {
        "name": "train", "image": job["IMAGE"], "command": ["/bin/sh", "-c", command],
        "env": [{"name": "MACHINE_RANK", "valueFrom": {"fieldRef": {
            "fieldPath": "metadata.annotations['batch.kubernetes.io/job-completion-index']"}}}],
        "ports": [{"containerPort": port, "name": "dist"}],
        "volumeMounts": mounts, "resources": _resources(cpus, job["MEMORY_PER_NODE"], gpus, job["GPU_RESOURCE"]),
    }  # fmt: skip
    pod = _pod_spec(job, container, gpus, volumes)
    pod.update({"subdomain": name, "restartPolicy": "Never"})
    labels = _labels(job, "training")
    service = {"apiVersion": "v1", "kind": "Service",
               "metadata": {"name": name, "namespace": job["NAMESPACE"], "labels": labels},
               "spec": {"clusterIP": "None", "publishNotReadyAddresses": True,
                        "selector": {"batch.kubernetes.io/job-name": name},
                        "ports": [{"name": "dist", "port": port, "targetPort": port}]}}  # fmt: skip
    spec: dict = {"completionMode": "Indexed", "completions": nodes, "parallelism": nodes, "backoffLimit": 0,
                  "ttlSecondsAfterFinished": 600,
                  "template": {"metadata": {"labels": labels}, "spec": pod}}  # fmt: skip
    if job["TIME_LIMIT"]:
        spec["activeDeadlineSeconds"] = time_seconds(job["TIME_LIMIT"])
    job_obj = {"apiVersion": "batch/v1", "kind": "Job",
               "metadata": {"name": name, "namespace": job["NAMESPACE"], "labels": labels}, "spec": spec}  # fmt: skip
    return [service, job_obj]


def manifests(job: Job) -> dict[str, list[dict]]:
    """File name -> the objects it holds."""
    out = {"rayjob.yaml": [rayjob(job)]}
    if job.has_training:
        out["train.yaml"] = training(job)
    return out


def to_yaml(objects: list[dict], source: str) -> str:
    import yaml

    class Dumper(yaml.SafeDumper):
        def ignore_aliases(self, data):  # write shared parts out in full: no &anchors
            return True

    header = f"# Rendered by cluster/render.py from {source}: edit that file and render again, not this one.\n"
    return header + "".join("---\n" + yaml.dump(o, Dumper=Dumper, sort_keys=False, default_flow_style=False,
                                                width=120) for o in objects)  # fmt: skip


# -- command line ---------------------------------------------------------------------------------------------------


def _shown(path: str) -> str:
    """A job file's name in the manifests' header: relative to the repository when it is inside it."""
    try:
        return str(Path(path).resolve().relative_to(HERE.parent))
    except ValueError:
        return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="render.py", description=__doc__.split("\n\n")[0])
    p.add_argument("what", choices=["check", "run-args", "slurm", "slurm-train", "k8s"])
    p.add_argument("files", nargs="+", help="job description files (KEY=VALUE), later ones override")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override one key")
    p.add_argument("--submit", action="store_true", help="slurm, slurm-train: submit it, print the job id")
    p.add_argument("--out", help="k8s: write the manifests into this folder (default: print them)")
    args = p.parse_args(argv)
    try:
        job = load(args.files, args.set)
        source = " ".join(_shown(f) for f in args.files)
        if args.what == "check":
            job.run_args()
            if job.has_training:
                job.train_args()
            warnings = for_slurm(job, ("run", "train") if job.has_training else ("run",))
            for key in DEFAULTS:
                print(f"{key}={shlex.quote(job[key]) if job[key] else ''}")
            for warning in warnings:
                print(f"render.py: warning (SLURM): {warning}", file=sys.stderr)
        elif args.what == "run-args":
            print("\n".join(job.run_args()))
        elif args.what in ("slurm", "slurm-train"):
            kind = "run" if args.what == "slurm" else "train"
            job.run_args() if kind == "run" else job.train_args()  # its mistakes before any warning
            for warning in for_slurm(job, (kind,)):
                print(f"render.py: warning: {warning}", file=sys.stderr)
            cmd, env = sbatch_command(job, kind)
            if args.submit:
                if job["SLURM_LOG_DIR"]:  # sbatch does not make it: a job whose log cannot be opened fails unseen
                    try:
                        Path(job["SLURM_LOG_DIR"]).mkdir(parents=True, exist_ok=True)
                    except OSError as e:
                        raise JobError(f"SLURM_LOG_DIR={job['SLURM_LOG_DIR']}: cannot make it ({e.strerror})") from None
                return submit(cmd, env)
            print(" ".join([*(f"{k}={shlex.quote(v)}" for k, v in env.items()), shlex.join(cmd)]))
        else:
            files = manifests(job)
            for warning in for_k8s(job):
                print(f"render.py: warning: {warning}", file=sys.stderr)
            if args.out:
                Path(args.out).mkdir(parents=True, exist_ok=True)
                for name, objects in files.items():
                    (Path(args.out) / name).write_text(to_yaml(objects, source))
                    print(Path(args.out) / name)
            else:
                print(to_yaml([o for objs in files.values() for o in objs], source), end="")
    except JobError as e:
        print(f"render.py: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
