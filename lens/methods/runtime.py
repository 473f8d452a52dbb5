"""Running a backbone's forward pass with ONNX Runtime instead of eager PyTorch, on CPU.

On 2 CPU cores ONNX Runtime runs the CNN backbones 2-4x faster than eager PyTorch (EfficientNet-Lite0
2.7-3.8x, ResNet-50 2.0-2.9x; docs/performance.md) and a ViT about as fast (0.84x at batch 1, up to
1.07x in batches). So on CPU a backbone is exported once to ONNX (pixels in, pooled features out),
cached on disk by its weights fingerprint, and run by an ONNX Runtime session. A text tower (CLIP,
SigLIP: token ids in, features out) is exported the same way, with its own input names.

Choose with ``LENS_RUNTIME``: ``auto`` (the default: ONNX Runtime on CPU when it is installed and the
export checks out, else PyTorch), ``onnx`` (the same, but a failure is an error) or ``torch``.
An exported model is only used after it gave the same features as PyTorch on a probe batch; anything
else falls back to PyTorch with a warning. The embeddings agree to within 1e-5, so indexes built with
either runtime are searched with the other.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from lens.errors import ModelLoadError

log = logging.getLogger("lens")

RUNTIMES = ("auto", "onnx", "torch")
# Tracing a backbone for export warns about Python values it freezes; the export is checked against
# PyTorch instead. A filter here, not only in _export: warnings.catch_warnings is not thread-safe, and
# the app exports on a background thread.
warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
_EXPORTING = threading.Lock()
#: Largest difference between PyTorch's and ONNX Runtime's features on the probe that is accepted.
TOLERANCE = 1e-3


def runtime_setting(value: str | None = None) -> str:
    """The runtime asked for: ``value``, else ``$LENS_RUNTIME``, else ``auto``."""
    runtime = (value or os.environ.get("LENS_RUNTIME") or "auto").strip().lower()
    if runtime not in RUNTIMES:
        raise ModelLoadError(f"LENS_RUNTIME must be one of {', '.join(RUNTIMES)}, got '{runtime}'")
    return runtime


def cache_dir() -> Path:
    """Where exported models are kept: ``$LENS_CACHE_DIR/onnx``, else ``~/.cache/lens/onnx``."""
    base = os.environ.get("LENS_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "lens"
    )
    return Path(base) / "onnx"


class OnnxForward:
    """A forward pass ``pixels (B, 3, H, W) -> features (B, D)`` run by an ONNX Runtime session.

    A model exported with several inputs (a text tower: ``input_ids`` and ``attention_mask``, both
    ``(B, L)`` int64) takes them positionally, in the order of ``names``; an input the export pruned
    (unused by the model) is skipped.
    """

    def __init__(self, path: Path, threads: int, names: Sequence[str] = ("pixels",)):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = self.threads = max(1, threads)
        options.inter_op_num_threads = 1
        options.log_severity_level = 3  # errors only
        self.path = path
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.input = self.session.get_inputs()[0].name
        self.names = tuple(names)
        self._kept = {i.name for i in self.session.get_inputs()}
        self._single: OnnxForward | None = None
        self._single_lock = threading.Lock()

    def __call__(self, *inputs: torch.Tensor | np.ndarray) -> torch.Tensor:
        feeds = {}
        for name, value in zip(self.names, inputs):
            if isinstance(value, torch.Tensor):
                value = value.detach().cpu().numpy()
            if name in self._kept:
                kind = np.int64 if np.asarray(value).dtype.kind in "iub" else np.float32
                feeds[name] = np.ascontiguousarray(value, dtype=kind)
        return torch.from_numpy(self.session.run(None, feeds)[0])

    def single_threaded(self) -> OnnxForward:
        """The same model in a one-thread session (made on first use), for bulk embedding.

        On 2 cores, two one-thread runs side by side get more images/s out of a light CNN than one
        two-thread run (EfficientNet-Lite0: 167 against 141 img/s at batch 8), and they leave room for
        decoding in between. A session's ``run`` is safe to call from several threads at once.
        """
        with self._single_lock:
            if self._single is None:
                self._single = self if self.threads == 1 else OnnxForward(self.path, 1, self.names)
            return self._single

    def release_single_threaded(self) -> None:
        """Drop the one-thread session and the memory its runs hold (EfficientNet-Lite0 in two
        streams of 32: about 1.3 GB); runs still in flight finish on it, the next makes a new one."""
        with self._single_lock:
            if self._single is not self:
                self._single = None


def onnx_forward(
    module: torch.nn.Module, key: str, probe: torch.Tensor | tuple[torch.Tensor, ...], expected: torch.Tensor,
    *, threads: int | None = None, names: Sequence[str] = ("pixels",),
) -> OnnxForward:
    """``module`` (pixels -> features, in eval mode) exported to ONNX and loaded in ONNX Runtime.

    ``key`` names the export in the cache (weights fingerprint and pooling); it is exported once.
    ``expected`` is ``module(probe)``. A module with several inputs gets ``probe`` as a tuple and
    their ``names`` (a batch axis each). Raises RuntimeError when ONNX Runtime is missing, the export
    fails or its features on ``probe`` differ from ``expected``.
    """
    try:
        import onnxruntime  # noqa: F401  (only whether it is installed)
    except ImportError as exc:
        raise RuntimeError("onnxruntime is not installed") from exc
    probes = probe if isinstance(probe, tuple) else (probe,)
    with _EXPORTING:  # torch.onnx.export keeps global state: one export at a time
        return _exported(module, key, probes, expected, threads, tuple(names))


def _exported(module: torch.nn.Module, key: str, probe: tuple[torch.Tensor, ...], expected: torch.Tensor,
              threads: int | None, names: tuple[str, ...]) -> OnnxForward:
    digest = hashlib.sha256(f"{key}|torch {torch.__version__}".encode()).hexdigest()[:20]
    path = cache_dir() / f"{digest}.onnx"
    for attempt in ("cached", "fresh"):
        if attempt == "fresh" or not path.is_file():
            _export(module, probe, path, names)
        try:
            runner = OnnxForward(path, threads or torch.get_num_threads(), names)
            difference = max(float((runner(*probe) - expected).abs().max()),  # the batch size it was traced
                             float((runner(*(p[:1] for p in probe)) - expected[:1]).abs().max()))  # and another
        except Exception as exc:  # a damaged file in the cache: export again
            error: Exception = exc
        else:
            if difference <= TOLERANCE:
                return runner
            error = RuntimeError(f"ONNX Runtime's features differ from PyTorch's by {difference:.2g}")
        path.unlink(missing_ok=True)
    raise error


def _export(module: torch.nn.Module, probe: tuple[torch.Tensor, ...], path: Path, names: tuple[str, ...]) -> None:
    from lens.trained import replace_atomically

    def write(temporary: str) -> None:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # tracer and deprecation notes
            torch.onnx.export(
                module, probe, temporary, input_names=list(names), output_names=["features"],
                dynamic_axes={**{name: {0: "batch"} for name in names}, "features": {0: "batch"}},
                opset_version=17, dynamo=False,
            )

    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    replace_atomically(path, write)
    log.info("exported %s to ONNX: %s", type(module).__name__, path)


class Pooled(torch.nn.Module):
    """A backbone and its pooling rule as one module: pixels in, pooled features out."""

    def __init__(self, model: torch.nn.Module, pool: Callable[[object], torch.Tensor]):
        super().__init__()
        self.model = model
        self._pool = pool

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """Pooled features of ``(n, 3, H, W)`` float pixel values: ``(n, dim)`` float32, not normalised."""
        return self._pool(self.model(pixel_values=pixels)).float()
