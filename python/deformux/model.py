"""DeformUX-Net (and 3D UX-Net) on NumPy arrays: the whole network of ARCHITECTURE.md.

    m = deformux.DeformUXNet(in_channels=1, out_channels=16, feature_size=(48, 96, 192, 384),
                             depths=(2, 2, 2, 2), hidden_size=768, block="deformux", mlp="dense",
                             offset_mode="aligned", kernel_size=7)   # kernel_size: uxnet only
    m.load("weights.safetensors")      # strict; raises with the full list of problems
    m.save("weights.safetensors")      # atomic write
    y = m.forward(x)                   # x (N, Cin, D, H, W) float32 -> logits (N, Cout, D, H, W)
    m.num_parameters(); m.state_dict(); m.load_state_dict(d)

Parameter names are the released PyTorch code's (``deformuxnet_3d.stages.0.0.ddc.weight``, ...), so a
converted official checkpoint (``python3 -m deformux.convert model.pth model.safetensors``) loads as it
is. ``offset_mode="official"`` reproduces the released code's offset alignment; checkpoints trained
with it need it. The array policy of :mod:`deformux.ops` applies: float32, C-contiguous, no silent
conversion; D, H and W must be multiples of 16 (pad the volume first).
"""
import json
import os
import threading
import weakref

import numpy as np

from . import _C

__all__ = ["DeformUXNet", "Session"]

_CHOICES = {
    "block": ("deformux", "uxnet"),
    "mlp": ("dense", "grouped", "none"),
    "offset_mode": ("aligned", "official"),
    "offset_planes": ("all", "xy", "xz", "yz"),
    "deformable": ("depthwise", "standard"),
}


def _int(name, v, minimum=1, maximum=2**63 - 1):
    """An int (or NumPy integer) in minimum..maximum; the default maximum is what the C ABI's int64
    arguments carry (the engine then applies its own bounds, with messages of its own)."""
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
        raise TypeError(f"DeformUXNet: {name} must be an int, got {type(v).__name__}")
    if v < minimum:
        raise ValueError(f"DeformUXNet: {name} must be >= {minimum}, got {v}")
    if v > maximum:
        raise ValueError(f"DeformUXNet: {name} must be <= {maximum}, got {v}")
    return int(v)


def _ints(name, v, count, minimum):
    try:
        values = tuple(v)
    except TypeError:
        raise TypeError(f"DeformUXNet: {name} must be a sequence of {count} ints, got {type(v).__name__}") from None
    if len(values) != count:
        raise ValueError(f"DeformUXNet: {name} must have {count} values, got {len(values)}")
    return [_int(f"{name}[{i}]", x, minimum) for i, x in enumerate(values)]


def _choice(name, v):
    if v not in _CHOICES[name]:
        raise ValueError(f"DeformUXNet: {name} must be one of {', '.join(_CHOICES[name])}, got {v!r}")
    return v


class DeformUXNet:
    """The network with PyTorch's default initialisation (offset branches zero, gamma 1e-6), or the
    weights you load. See the module docstring for the API; ``seed`` makes the initialisation
    reproducible."""

    def __init__(self, in_channels=1, out_channels=16, feature_size=(48, 96, 192, 384), depths=(2, 2, 2, 2),
                 hidden_size=768, block="deformux", mlp=None, offset_mode="aligned", kernel_size=7,
                 offset_kernel=1, offset_planes="all", deformable="depthwise", seed=0):
        block = _choice("block", block)
        config = {
            "in_channels": _int("in_channels", in_channels),
            "out_channels": _int("out_channels", out_channels),
            "feature_size": _ints("feature_size", feature_size, 4, 1),
            "depths": _ints("depths", depths, 4, 0),
            "hidden_size": _int("hidden_size", hidden_size),
            "block": block,
            "mlp": _choice("mlp", mlp if mlp is not None else ("grouped" if block == "uxnet" else "dense")),
            "offset_mode": _choice("offset_mode", offset_mode),
            "kernel_size": _int("kernel_size", kernel_size),
            "offset_kernel": _int("offset_kernel", offset_kernel),
            "offset_planes": _choice("offset_planes", offset_planes),
            "deformable": _choice("deformable", deformable),
        }
        self._handle = _C.model_create(json.dumps(config), _int("seed", seed, 0, 2**64 - 1))
        self._tensors = _C.model_tensors(self._handle)
        self._new_locks()
        self._session = None
        _live_models.add(self)
        self._index = {name: i for i, (name, _) in enumerate(self._tensors)}

    def _new_locks(self):
        """The Python-side locks: the default session's creation, and the model's gradients (one
        backward at a time). Made again in a forked child (see _after_fork_in_child)."""
        self._lock = threading.Lock()
        self._grad_lock = threading.Lock()
        self._grad_owner = None

    @classmethod
    def from_file(cls, path, **overrides):
        """A network built from the configuration recorded in a safetensors file (written by
        :meth:`save` or ``deformux.convert``), with its weights loaded strictly. `path`: str, bytes or
        os.PathLike."""
        path = os.fsdecode(path)
        config = dict(_read_config(path))
        config.update(overrides)
        m = cls(**config)
        m.load(path)
        return m

    @property
    def config(self):
        """The configuration as a dict of the constructor's arguments."""
        return json.loads(_C.model_config_json(self._handle))

    def __repr__(self):
        c = self.config
        return (f"DeformUXNet(block={c['block']!r}, mlp={c['mlp']!r}, offset_mode={c['offset_mode']!r}, "
                f"in_channels={c['in_channels']}, out_channels={c['out_channels']}, "
                f"feature_size={tuple(c['feature_size'])}, parameters={self.num_parameters():,})")

    def num_parameters(self):
        """The number of trainable parameters (55,790,776 for the default configuration)."""
        return _C.model_num_parameters(self._handle)

    def _check_input(self, op, x, name="x", channels=None):
        c = self.config
        channels = c["in_channels"] if channels is None else channels
        if not isinstance(x, np.ndarray):
            raise TypeError(f"{op}: {name} must be a numpy.ndarray of float32, got {type(x).__name__}")
        if x.dtype != np.float32 or not x.dtype.isnative:
            raise TypeError(f"{op}: {name} must have dtype float32, got {x.dtype}; use {name}.astype(np.float32)")
        if x.ndim != 5 or x.shape[1] != channels:
            raise ValueError(f"{op}: {name} must have shape (N, {channels}, D, H, W), got {x.shape}")
        if 0 in x.shape:
            raise ValueError(f"{op}: {name} must not have a zero-size dimension, got shape {x.shape}")
        for axis, s in zip("DHW", x.shape[2:]):
            if s % 16:
                raise ValueError(f"{op}: D, H and W must be multiples of 16 (pad the volume "
                                 f"first), got {axis} = {s} in shape {x.shape}")
        if not x.flags.c_contiguous:
            raise ValueError(f"{op}: {name} must be C-contiguous; use np.ascontiguousarray({name})")

    def _default_session(self):
        with self._lock:
            if self._session is None:
                self._session = Session(self)
            return self._session

    def session(self):
        """A new :class:`Session` running this model: its own working memory (activations, packed
        weights), so that several threads can run the model at the same time, one session each."""
        return Session(self)

    def forward(self, x, progress=None):
        """Logits (N, Cout, D, H, W), no softmax, for x (N, Cin, D, H, W) float32.

        Runs on the model's default :class:`Session` (calls from several threads take turns; use
        :meth:`session` for one per thread). ``progress(done, total)`` (optional) is called between the
        network's steps; returning False cancels the call (``deformux.DeformUXError``). Ctrl-C cancels
        too (KeyboardInterrupt), also in the middle of a step. The callback may use the model (for
        example read its ``state_dict()``): the engine holds no lock of the model while it calls back.
        """
        return self._default_session().forward(x, progress=progress)

    def backward(self, x, grad_output, return_input_grad=False, progress=None):
        """The gradients of ``sum(forward(x) * grad_output)`` with respect to every parameter.

        x: (N, Cin, D, H, W) float32; grad_output: shaped like the logits, (N, Cout, D, H, W) float32.
        Returns a dict, state-dict name -> float32 array in the parameter's shape (PyTorch layouts), or,
        with ``return_input_grad=True``, ``(grads, grad_x)`` with grad_x shaped like x. The model's
        gradients are zeroed first and hold the result afterwards (:meth:`gradients`). ``progress`` as
        for :meth:`forward` (a backward reports twice the forward's steps).
        """
        return self._default_session().backward(x, grad_output, return_input_grad=return_input_grad,
                                                progress=progress)

    def zero_grad(self):
        """Sets every parameter gradient to zero (backward passes add into them)."""
        _C.model_zero_grad(self._handle)

    def gradients(self):
        """A dict of name -> float32 array (copies): the parameter gradients, PyTorch layouts."""
        out = {}
        for i, (name, shape) in enumerate(self._tensors):
            a = np.empty(shape, np.float32)
            _C.model_get_grad(self._handle, i, a)
            out[name] = a
        return out

    __call__ = forward

    def load(self, path, strict=True):
        """Loads weights from a safetensors file (F32, F16, BF16 or F64). Strict: raises ValueError
        listing every missing, unexpected and mis-shaped name, and loads nothing. Returns the report
        (a text: counts, then the names of each kind of problem)."""
        _C.model_load(self._handle, os.fsdecode(path), bool(strict))  # str, bytes or os.PathLike
        return _C.model_last_report(self._handle)

    def save(self, path):
        """Writes the weights (F32 safetensors, configuration in the metadata), atomically."""
        _C.model_save(self._handle, os.fsdecode(path))  # str, bytes or os.PathLike

    def state_dict(self):
        """A dict of name -> float32 array (copies), in the released code's names and order."""
        out = {}
        for i, (name, shape) in enumerate(self._tensors):
            a = np.empty(shape, np.float32)
            _C.model_get_tensor(self._handle, i, a)
            out[name] = a
        return out

    def load_state_dict(self, state_dict, strict=True):
        """Loads a dict of name -> array (float32; other float dtypes are converted with a copy).
        Names may carry ``module.`` or the prototype names (``convxnet.``, ``.dcn.``). Strict: raises
        ValueError listing every missing, unexpected and mis-shaped name, loading nothing. Returns the
        report text."""
        if not hasattr(state_dict, "items"):
            raise TypeError(f"load_state_dict: expected a dict of name -> array, got {type(state_dict).__name__}")
        items = []
        for name, a in state_dict.items():
            if not isinstance(name, str):
                raise TypeError(f"load_state_dict: keys must be str, got {type(name).__name__}")
            a = np.asarray(a)
            if a.dtype.kind != "f":
                raise TypeError(f"load_state_dict: {name} must be a floating-point array, got {a.dtype}")
            items.append((name, np.ascontiguousarray(a, dtype=np.float32)))
        _C.model_load_tensors(self._handle, items, bool(strict))
        return _C.model_last_report(self._handle)

    def release_memory(self):
        """Frees the memory the default session keeps between forwards (activation memory reused from
        one call to the next, and the weights packed for the kernels). The next forward allocates it
        again."""
        with self._lock:
            session = self._session
        if session is not None:
            session.release_memory()

    def summary(self, input_size=(96, 96, 96), batch=1):
        """Per-module parameters and multiply-adds for an input of spatial size ``input_size`` (one
        integer or three; ints or NumPy integers), as text."""
        if isinstance(input_size, (int, np.integer)):
            input_size = (input_size,) * 3
        d, h, w = _ints("input_size", input_size, 3, 1)
        return _C.model_summary(self._handle, _int("batch", batch), d, h, w)


class Session:
    """What runs a :class:`DeformUXNet`: its working memory (activations, scratch, the weights packed for
    the kernels, kept between calls and refreshed when the model's weights change). Several sessions
    can run one model at the same time from different threads; one session runs one call at a time
    (others wait). ``model.forward`` uses the model's default session; make one per thread with
    ``model.session()``."""

    def __init__(self, model):
        if not isinstance(model, DeformUXNet):
            raise TypeError(f"Session: model must be a DeformUXNet, got {type(model).__name__}")
        self.model = model
        self._handle = _C.session_create(model._handle)

    def forward(self, x, progress=None):
        """Logits (N, Cout, D, H, W) for x (N, Cin, D, H, W) float32; see :meth:`DeformUXNet.forward`."""
        m = self.model
        m._check_input("DeformUXNet.forward", x)
        if progress is not None and not callable(progress):
            raise TypeError("DeformUXNet.forward: progress must be callable or None")
        y = np.empty((x.shape[0], m.config["out_channels"]) + x.shape[2:], np.float32)
        _C.session_forward(self._handle, x, y, progress)
        return y

    __call__ = forward

    def backward(self, x, grad_output, return_input_grad=False, progress=None):
        """See :meth:`DeformUXNet.backward`."""
        op = "DeformUXNet.backward"
        m = self.model
        m._check_input(op, x)
        m._check_input(op, grad_output, "grad_output", channels=m.config["out_channels"])
        if grad_output.shape[0] != x.shape[0] or grad_output.shape[2:] != x.shape[2:]:
            raise ValueError(f"{op}: grad_output must be shaped like the logits, "
                             f"{(x.shape[0], m.config['out_channels']) + x.shape[2:]}, got {grad_output.shape}")
        if progress is not None and not callable(progress):
            raise TypeError(f"{op}: progress must be callable or None")
        # The model's gradients belong to one backward at a time (zero, accumulate, copy out).
        me = threading.get_ident()
        if m._grad_owner == me:
            raise RuntimeError(f"{op}: called from inside a backward of the same model (its progress callback)")
        with m._grad_lock:
            m._grad_owner = me
            try:
                grad_x = np.empty(x.shape, np.float32) if return_input_grad else None
                _C.model_zero_grad(m._handle)
                _C.session_backward(self._handle, x, grad_output, grad_x, progress)
                grads = m.gradients()
            finally:
                m._grad_owner = None
        return (grads, grad_x) if return_input_grad else grads

    def release_memory(self):
        """Frees what the session keeps between calls; the next call allocates it again."""
        _C.session_release_memory(self._handle)

    @property
    def retained_bytes(self):
        """Bytes the session keeps between calls (packed weights, activation memory, scratch)."""
        return _C.session_retained_bytes(self._handle)


# Every live model, for the fork handler below.
_live_models = weakref.WeakSet()


def _after_fork_in_child():
    """A thread of the parent may have held a model's Python locks when the process forked (a backward
    holds the gradient lock for its whole call); that thread does not exist in the child, so the child
    would wait for it forever. The child gets new, unlocked ones (the engine re-creates its own locks
    the same way, Sources/DeformUX/Tensor/Locks.swift)."""
    for m in list(_live_models):
        m._new_locks()


os.register_at_fork(after_in_child=_after_fork_in_child)


def _damaged(path, message):
    """The error for a damaged or foreign file, as the engine raises it (an OSError with .filename)."""
    e = _C.FileFormatError(f"{path}: {message}")
    e.filename = path
    return e


def _read_config(path):
    """The configuration in a safetensors file's metadata (key ``deformux.config``). A damaged file
    raises deformux.FileFormatError, as DeformUXNet.load does."""
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) != 8:
            raise _damaged(path, "not a safetensors file (shorter than 8 bytes)")
        n = int.from_bytes(head, "little")
        if n > 100 * 1024 * 1024:
            raise _damaged(path, f"not a safetensors file (header length {n})")
        try:
            header = json.loads(f.read(n))
        except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
            raise _damaged(path, f"not a safetensors file (its header is not JSON: {e})") from None
    if not isinstance(header, dict):
        raise _damaged(path, "not a safetensors file (its header is not a JSON object)")
    meta = header.get("__metadata__") or {}
    if "deformux.config" not in meta:
        raise ValueError(f"{path}: no deformux.config in the metadata; build DeformUXNet(...) with the "
                         f"right configuration and call load()")
    return json.loads(meta["deformux.config"])
