"""Embedding a gallery on a Ray cluster: a Ray Data pipeline in place of :func:`lens.embedding.embed_files`.

    >>> with RayCluster() as cluster:                       # a local Ray on this machine (loopback only)
    ...     embed = cluster.embedder("hf:./efficientnet", model=None)
    ...     embedded = embed(method, paths, batch_size=8)   # the same Embedded as embed_files gives

Only the step "image files -> vectors" moves to Ray: the paths become a dataset
(``ray.data.from_items``), and ``map_batches`` sends batches of paths to a pool of actors
(``ActorPoolStrategy``). Each actor loads the method once (:func:`lens.methods.create_method`, the
same registry and weights as this process; their fingerprint is checked) and reads, decodes,
prepares and embeds its batches with :func:`lens.embedding.embed_files`, the single-process code, so
the vectors are those of a single-process build. Everything else (which images changed, the index,
the manifest, publishing the build, any index backend) stays in :mod:`lens.indexing`.

Ray is an optional dependency (``pip install 'lens[scale]'``): this module imports it only when a
cluster is started. Image paths travel to the actors as absolute paths, so on a cluster of several
machines the gallery (and a local model folder) must be at the same path on every node (a shared
file system). Methods that learn from the gallery (``sift``, ``local``: a visual vocabulary, kept
per-image keypoints) are not embedded on Ray (see :func:`embeds_on_ray`).
"""

from __future__ import annotations

import logging
import math
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from lens.embedding import GPU_BATCH_SIZE, Embedded, default_batch_size, embed_files
from lens.errors import LensError
from lens.types import LearnsFromGallery, Method

log = logging.getLogger("lens")

#: What to install for ``--ray`` (the ``scale`` extra of lens pins the same).
RAY_REQUIREMENT = "ray[data]==2.60.0"
#: Model batches per Ray batch: an actor decodes the next model batch while the model runs one.
MODEL_BATCHES_PER_RAY_BATCH = 4
#: Seconds a local Ray's processes get to end after ``ray.shutdown`` before they are killed.
STOP_WAIT = 10.0
Embed = Callable[..., Embedded]  # embed_files(method, paths, *, batch_size, ...) -> Embedded


def embeds_on_ray(method: Method) -> bool:
    """Whether ``method`` embeds each image on its own and so can run on Ray actors.

    False for a method that learns from the gallery (:class:`~lens.types.LearnsFromGallery`: SIFT
    and local features fit a visual vocabulary on the gallery and keep per-image keypoints in the
    build); such methods are built in this process.
    """
    return not isinstance(method, LearnsFromGallery)


@dataclass
class RayCluster:
    """A Ray cluster to embed on: a local one started here (``address=None``) or an existing one.

    ``address``: None starts a local Ray bound to 127.0.0.1 (nothing listens on another address;
    Ray's token authentication stays as Ray sets it), with ``num_cpus`` CPUs (default: all); else
    what :func:`ray.init` takes (``auto``, ``HOST:6379``, ``ray://HOST:10001``).
    ``actors``: embedding actors, each loading the model once (default: one per GPU when the cluster
    has GPUs, else one per CPU). ``cpus_per_actor``: CPUs Ray reserves for each actor; fractional by
    default so that Ray Data's own tasks still get a CPU (on 2 CPUs, two actors at 1 CPU each left none
    and the pipeline hung). ``gpus_per_actor``: default 1 when the cluster has GPUs, else 0.
    ``temp_dir``: Ray's session folder for a local Ray (default: Ray's, ``/tmp/ray``).

    A context manager: ``__enter__`` connects (or starts) and ``__exit__`` disconnects, stopping a
    local Ray with every process it started. Raises :class:`LensError` when Ray is not installed or
    the cluster cannot be reached.
    """

    address: str | None = None
    num_cpus: int | None = None
    actors: int | None = None
    cpus_per_actor: float = 0.5
    gpus_per_actor: float | None = None
    temp_dir: str | None = None
    _connected: bool = field(default=False, init=False, repr=False)  #: ray.init was called by this object
    _started_here: bool = field(default=False, init=False, repr=False)  #: ... and started a local Ray

    def __enter__(self) -> RayCluster:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        """Connect to the cluster (or start the local one); a no-op when this process already is
        connected to a Ray (then that one is used, and :meth:`stop` leaves it be)."""
        if self.address is None:
            # Ray picks the machine's outward address unless it runs "without clusters", which it reads
            # when imported: then every Ray process (GCS, raylet, workers) listens on 127.0.0.1 only
            os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
        ray = _import_ray()
        if ray.is_initialized():
            return
        options: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False,
                                   "logging_level": logging.WARNING, "runtime_env": _runtime_env()}
        if self.address is not None:
            _check_reachable(self.address)
        try:
            if self.address is None:
                ray.init(num_cpus=self.num_cpus, _node_ip_address="127.0.0.1", _temp_dir=self.temp_dir,
                         **options)
                self._started_here = True
            else:
                ray.init(address=self.address, **options)
            self._connected = True
        except Exception as exc:  # ConnectionError, ValueError, RuntimeError (auth) ...
            where = f"at '{self.address}'" if self.address else "on this machine"
            raise LensError(f"cannot start or reach a Ray cluster {where}: {_first_line(exc)}") from exc
        logging.getLogger("ray.data").setLevel(logging.WARNING)  # no "execution finished" per dataset
        context = ray.data.DataContext.get_current()
        context.enable_progress_bars = False  # lens shows its own bar
        context.print_on_execution_start = False

    def stop(self) -> None:
        """Disconnect if :meth:`start` connected; a local Ray started here stops with every process it started.

        ``ray.shutdown`` ends the GCS and the raylet, but the embedding actors outlive them, orphaned
        and spinning for minutes (Ray 2.60, seen on every run here); those left after ``STOP_WAIT``
        seconds are killed.
        """
        ray = _import_ray()
        if not (self._connected and ray.is_initialized()):
            return
        ours = _ray_processes() if self._started_here else []
        ray.shutdown()
        self._connected = self._started_here = False
        if ours:
            import psutil

            _, alive = psutil.wait_procs(ours, timeout=STOP_WAIT)
            for process in alive:
                log.info("stopping Ray process %d, still running after Ray shut down", process.pid)
                process.kill()
            psutil.wait_procs(alive, timeout=STOP_WAIT)

    def resources(self) -> tuple[float, float]:
        """The cluster's CPUs and GPUs (logical, as Ray counts them)."""
        ray = _import_ray()
        total = ray.cluster_resources()
        return float(total.get("CPU", 0)), float(total.get("GPU", 0))

    def embedder(self, spec: str, model: str | None = None) -> Embed:
        """A function with :func:`lens.embedding.embed_files`'s arguments and result that embeds on the
        cluster with the method ``spec`` (and ``model``, its weights override), loaded by each actor."""

        def embed(method: Method, paths: Sequence[Path], **options: Any) -> Embedded:
            return self.embed(spec, model, method, paths, **options)

        return embed

    def embed(
        self,
        spec: str,
        model: str | None,
        method: Method,
        paths: Sequence[Path],
        *,
        batch_size: int | None = None,
        workers: int = 2,
        progress: bool = True,
        desc: str | None = None,
        on_progress: Callable[[int, int], None] | None = None,
        keep_prepared: bool = False,
    ) -> Embedded:
        """Embed ``paths`` on the cluster as ``embed_files(method, paths, ...)`` would here.

        ``method`` is this process's copy of ``spec``: the actors' copies must have the same weights
        fingerprint and dimension. Returns vectors of ``method``'s dtype, ``(n, dim)`` float32 or
        packed uint8 bits, rows in the order of ``paths`` (unreadable files skipped, as there).
        ``workers``: decoding threads in each actor. Raises :class:`LensError` for a method that
        learns from the gallery (``keep_prepared``), or when an actor fails (the model cannot load
        there, other weights, a lost node).
        """
        if keep_prepared or not embeds_on_ray(method):
            raise LensError(f"method '{spec}' learns from the gallery and cannot be embedded on Ray")
        if not paths:
            width, dtype = _row_shape(method)
            return Embedded(np.zeros((0, width), dtype), [])
        self.start()
        ray = _import_ray()
        cpus, gpus = self.resources()
        gpus_per_actor = self.gpus_per_actor if self.gpus_per_actor is not None else (1.0 if gpus else 0.0)
        if gpus_per_actor:
            actors = self.actors or max(1, int(gpus // gpus_per_actor))
        else:
            actors = self.actors or max(1, int(cpus))
        model_batch = batch_size or (GPU_BATCH_SIZE if gpus_per_actor else default_batch_size(method))
        ray_batch = model_batch * MODEL_BATCHES_PER_RAY_BATCH
        actors = max(1, min(actors, math.ceil(len(paths) / ray_batch)))
        by_name = {os.path.abspath(path): Path(path) for path in paths}
        dataset = ray.data.from_items([{"path": name} for name in by_name])
        vectors = dataset.map_batches(
            _EmbedActor,
            fn_constructor_kwargs={"spec": spec, "model": model, "weights": method.info.weights,
                                   "dim": method.info.dim, "cwd": os.getcwd(), "batch_size": model_batch,
                                   "workers": workers},
            batch_size=ray_batch,
            batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=actors),
            num_cpus=self.cpus_per_actor,
            num_gpus=gpus_per_actor or None,
        )
        rows: dict[str, np.ndarray] = {}
        errors: dict[str, str] = {}
        try:
            with tqdm(total=len(paths), unit="img", desc=desc or method.info.name, disable=not progress,
                      dynamic_ncols=True) as bar:
                for batch in vectors.iter_batches(batch_size=None, batch_format="numpy"):
                    for name, vector, error in zip(batch["path"], batch["vector"], batch["error"]):
                        if error:  # told with the path as given, not the absolute one the actor read
                            errors[str(name)] = str(error).replace(str(name), str(by_name.get(str(name), name)))
                        else:
                            rows[str(name)] = vector
                    bar.update(len(batch["path"]))
                    if on_progress is not None:  # counted here: a disabled bar (progress=False) never counts
                        on_progress(len(rows) + len(errors), len(paths))
        except Exception as exc:  # RayTaskError, ActorDiedError, ...: the build is not published
            raise LensError(f"embedding on Ray failed: {_ray_error(exc)}") from exc
        done = [name for name in by_name if name in rows]
        skipped = [(by_name[name], errors[name]) for name in by_name if name in errors]
        for path, why in skipped:
            log.warning("skipped %s: %s", path, why)
        if done:
            stacked = np.stack([rows[name] for name in done])
        else:
            width, dtype = _row_shape(method)
            stacked = np.zeros((0, width), dtype)
        return Embedded(stacked, [by_name[name] for name in done], skipped)


class _EmbedActor:
    """One Ray actor: loads the method once, then embeds batches of paths with ``embed_files``."""

    def __init__(self, spec: str, model: str | None, weights: str, dim: int, cwd: str, batch_size: int,
                 workers: int):
        from lens.methods import create_method

        if os.path.isdir(cwd):  # relative model paths (hf:./weights/...) mean what they meant to the driver
            os.chdir(cwd)
        logging.basicConfig(level=logging.ERROR)  # skipped files are reported by the driver
        self.method = create_method(spec, model=model)
        info = self.method.info
        if (info.weights, info.dim) != (weights, dim):
            raise LensError(f"the Ray actor on {_hostname()} loaded other weights for '{spec}' "
                            f"({info.weights}, {info.dim}-d) than the driver ({weights}, {dim}-d): give every node "
                            "the same model files")
        self.batch_size, self.workers = batch_size, workers

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        names = [str(name) for name in batch["path"]]
        embedded = embed_files(self.method, [Path(name) for name in names], batch_size=self.batch_size,
                               workers=self.workers, progress=False)
        row = {str(path): n for n, path in enumerate(embedded.paths)}
        why = {str(path): error for path, error in embedded.skipped}
        width, dtype = _row_shape(self.method)
        if len(embedded.paths):
            width, dtype = embedded.vectors.shape[1], embedded.vectors.dtype
        vectors = np.zeros((len(names), width), dtype=dtype)
        for n, name in enumerate(names):
            if name in row:
                vectors[n] = embedded.vectors[row[name]]
        errors = np.array([why.get(name, "" if name in row else "not embedded") for name in names], dtype=object)
        return {"path": np.array(names, dtype=object), "vector": vectors, "error": errors}


def _ray_processes() -> list[Any]:
    """The processes of the local Ray this process started: its descendants running Ray (GCS, raylet,
    agents, workers); none when psutil is missing."""
    try:
        import psutil
    except ImportError:
        return []
    found = []
    for process in psutil.Process().children(recursive=True):
        try:
            command = " ".join(process.cmdline()) or process.name()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        if "ray" in command:
            found.append(process)
    return found


def _check_reachable(address: str, timeout: float = 5.0) -> None:
    """Fail fast when a ``HOST:PORT`` (or ``ray://HOST:PORT``) address does not answer: Ray itself
    retries for minutes. ``auto`` and other forms are left to Ray."""
    import socket

    match = re.fullmatch(r"(?:ray://)?\[?([^\]/]+?)\]?:(\d+)", address.strip())
    if match is None:
        return
    host, port = match.group(1), int(match.group(2))
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as exc:
        raise LensError(f"cannot reach a Ray cluster at '{address}': {exc.strerror or exc} (is `ray start "
                        "--head` running there, and is the port open?)") from exc


def _runtime_env() -> dict[str, Any]:
    """What every Ray worker needs to run this lens: its package (shipped by Ray, so the actors run the
    driver's code whatever lens the nodes have installed) and the settings that change the vectors."""
    env = {name: os.environ[name] for name in ("LENS_RUNTIME", "HF_HUB_OFFLINE") if name in os.environ}
    return {"py_modules": [str(Path(__file__).resolve().parent)], "env_vars": env}


def _row_shape(method: Method) -> tuple[int, np.dtype]:
    """Width and dtype of one vector (see :class:`~lens.types.Method`): packed bits for ``hamming``."""
    info = method.info
    if info.metric == "hamming":
        return (info.dim + 7) // 8, np.dtype(np.uint8)
    return info.dim, np.dtype(np.float32)


def _import_ray() -> Any:
    try:
        import ray
        import ray.data  # noqa: F401  (the [data] extra)
    except ImportError as exc:
        raise LensError(f"--ray needs Ray Data, which is not installed: pip install 'lens[scale]' "
                        f"(or pip install '{RAY_REQUIREMENT}')") from exc
    return ray


def _ray_error(exc: BaseException) -> str:
    """What went wrong in an actor, as one line: the last ``SomeError: message`` line of Ray's report
    (which carries the actor's traceback as text), else its first line."""
    lines = [line.strip() for line in str(exc).splitlines()]
    raised = [line for line in lines if re.match(r"^[\w.]+(Error|Exception): \S", line)]
    return raised[-1] if raised else _first_line(exc)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]


def _hostname() -> str:
    import socket

    return socket.gethostname()
