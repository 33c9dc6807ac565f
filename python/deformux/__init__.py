"""deformux: DeformUX-Net 3D medical image segmentation on the CPU (a Swift engine).

This package is a thin layer over the engine's C ABI (libDeformUXC.so, bundled next to the
extension ``deformux._C``): whole-volume segmentation (``deformux.segment``, ``deformux.Segmenter``),
the network (``deformux.DeformUXNet``) and its DDC operator (``deformux.ops``). Training comes next.

    labels = deformux.segment("t1.nii.gz", model="model.json", output="labels.nii.gz")

    import numpy as np, deformux
    m = deformux.DeformUXNet(out_channels=16)
    m.load("weights.safetensors")
    logits = m.forward(x)                                       # x float32, N x 1 x D x H x W
    y = deformux.ops.deform_conv3d(x, offsets, weight, bias)   # float32, N x C x D x H x W

Errors: bad arguments raise TypeError/ValueError naming the argument, out of memory MemoryError, other
engine failures :class:`DeformUXError` (a RuntimeError).
"""
import numbers

from . import _C
from ._C import DeformUXError, FileFormatError
from . import ops
from . import nifti
from .model import DeformUXNet, Session
# ---- segmentation (issue 8): segment(), Segmenter, model cards, metrics, figures, bundled data ----
from . import card, data, evaluate, figures
from .card import ModelCard
from .segment import Segmenter, segment
# ---- training (issue 9): the loss, Trainer, PatchSampler, train() ----
from . import losses
from .training import Trainer, PatchSampler
from .train import train, load_dataset

__version__ = "0.1.0"

# str(FileFormatError) is the engine's message (which already names the file): OSError's own __str__
# turns into "[Errno None] None: <filename>" as soon as .filename is set, as _C.raise_status sets it.
FileFormatError.__str__ = lambda self: str(self.args[0]) if self.args else ""

__all__ = ["ops", "nifti", "DeformUXNet", "Session", "DeformUXError", "FileFormatError", "set_num_threads",
           "get_num_threads", "release_memory", "engine_version", "__version__",
           "segment", "Segmenter", "ModelCard", "card", "data", "evaluate", "figures",
           "losses", "Trainer", "PatchSampler", "train", "load_dataset"]


def set_num_threads(n):
    """Sets the number of worker threads every engine call uses (default: the number of CPUs).

    n must be an integer >= 1 (an int or a NumPy integer; TypeError / ValueError otherwise). The
    setting is process-wide.
    """
    if isinstance(n, bool) or not isinstance(n, numbers.Integral):
        raise TypeError(f"set_num_threads: n must be an int, got {type(n).__name__}")
    n = int(n)
    if n < 1:
        raise ValueError(f"set_num_threads: n must be >= 1, got {n}")
    if n > 2**31 - 1:
        raise ValueError(f"set_num_threads: n is too large, got {n}")
    _C.set_num_threads(n)


def get_num_threads():
    """The number of worker threads engine calls use."""
    return _C.get_num_threads()


def release_memory():
    """Frees the scratch memory the operators in :mod:`deformux.ops` keep for the calling thread
    between calls (about 100 MB for a DDC at 48^3 x 48 channels; it is reused by the next call of a
    similar size and freed when the thread ends). Models keep their own: ``DeformUXNet.release_memory``."""
    ops.release_workspace()


def engine_version():
    """The version of the bundled engine library (dfx_version())."""
    return _C.version()
