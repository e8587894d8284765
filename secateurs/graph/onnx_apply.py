"""Apply a pruning plan to an ONNX model, and read/write ONNX files safely.

``apply_plan_onnx(model, plan)`` returns a pruned copy (the input is never modified):

* every tensor the plan names — an initializer, or a float ``Constant`` node's value — loses
  the plan's indices along each dim (``numpy_helper``);
* constants of layout ops are rewritten from the plan's ``constants`` (keyed by the node names
  of ``from_onnx.onnx_node_names``): ``Reshape``/``Expand`` shapes, ``Split`` sizes, ``Slice``
  starts/ends, ``Conv.group`` (depthwise and grouped convs lose whole groups),
  ``GroupNormalization.num_groups``. Tokens that still hold keep their meaning:
  ``-1`` stays ``-1``, ``0`` (copy the input dim) stays ``0`` where that dim did not change, and
  an ``Expand`` ``1`` stays ``1``, so a dynamic batch dim survives. A constant that is an
  initializer or ``Constant`` read by this node alone is rewritten in place; a shared one, or
  one computed at run time (``Shape`` → ``Gather`` → ``Concat``), is replaced by a new
  initializer for this node (computed shapes are then fixed to the analysed sizes, except one
  dim the original model left dynamic, written as ``-1``), and nodes left without consumers
  are removed;
* shape inference runs again and the result must pass the checker's ``full_check``
  (``check_full``: the structural check on the model, the strict shape inference on its
  weightless ``skeleton``, which infers the same shapes without serialising the weights).

Layout ops whose constants do not depend on widths (Flatten, Squeeze, Unsqueeze, Transpose)
and ops whose widths follow their initializers (Conv, Gemm, MatMul, norms) need nothing.
"""

from __future__ import annotations

import contextlib
import functools
import heapq
import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from secateurs.errors import InputError, PlanError
from secateurs.graph.from_onnx import (
    _SKELETON_KEEP,
    LAZY_BASEPATH,
    MS_DOMAIN,
    _is_param_init,
    _static,
    _subgraph_names,
    defer_tensor,
    external_info,
    fold_constants,
    infer_shapes_folding,
    is_deferred,
    is_lazy,
    onnx_node_names,
    opaque_custom,
    skeleton,
    tensor_array,
    with_input_shapes,
)
from secateurs.graph.ir import is_take
from secateurs.graph.onnx_untie import retie, untie_shared_vectors
from secateurs.passes.plan import Plan

__all__ = ["apply_plan_onnx", "zero_plan_slices_onnx", "load_onnx", "save_onnx",
           "uses_external_data", "has_lazy_tensors", "materialized", "TensorSpill",
           "sorted_topologically"]

log = logging.getLogger(__name__)


# ---------------------------------------------------------------- files


def uses_external_data(model: onnx.ModelProto) -> bool:
    from onnx.external_data_helper import _get_all_tensors
    return any(t.data_location == onnx.TensorProto.EXTERNAL for t in _get_all_tensors(model))


def sorted_topologically(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` itself where its nodes are in topological order, else a copy whose nodes
    are (a stable Kahn order; ONNX Runtime runs unsorted graphs, and fp16 converters write
    them: ``keep_io_types=True`` appends the input casts after their readers). A graph with
    a cycle is returned as it is, for the checker to reject."""
    graph = model.graph
    ready = {i.name for i in graph.input} | {t.name for t in graph.initializer} | {""}
    needs = [set(n.input) | set(_subgraph_names(n)) for n in graph.node]
    seen, in_order = set(ready), True
    for n, need in zip(graph.node, needs):
        if not need <= seen:
            in_order = False
            break
        seen.update(n.output)
    if in_order:
        return model
    producer = {o: k for k, n in enumerate(graph.node) for o in n.output if o}
    waiting = [sum(1 for v in need if v in producer) for need in needs]
    readers: dict[int, list[int]] = {}
    for k, need in enumerate(needs):
        for v in need:
            if v in producer:
                readers.setdefault(producer[v], []).append(k)
    heap = [k for k, w in enumerate(waiting) if w == 0]
    heapq.heapify(heap)
    order: list[int] = []
    while heap:
        k = heapq.heappop(heap)
        order.append(k)
        for r in readers.get(k, ()):
            waiting[r] -= 1
            if waiting[r] == 0:
                heapq.heappush(heap, r)
    if len(order) != len(graph.node):
        return model  # a cycle (or a value read twice from one producer list): as it is
    out = onnx.ModelProto()
    out.CopyFrom(model)
    del out.graph.node[:]
    out.graph.node.extend(graph.node[k] for k in order)
    return out


def load_onnx(path: str | os.PathLike[str], lazy: bool = False
              ) -> tuple[onnx.ModelProto, bool]:
    """Load a model with its external data; return it and whether it used external data.

    ``lazy=True`` leaves large external parameters of a model of ``LAZY_MIN_BYTES`` or more
    on disk (``from_onnx.is_lazy``: read by ``tensor_array`` when needed, copied by
    ``save_external`` without loading them); small ones and integer tensors (shape
    arithmetic) are loaded. A smaller model is loaded whole (its proto serialises as it is,
    for ONNX Runtime and friends). A missing file, a file that is not
    a (complete) ONNX protobuf, or a missing external data file raises :class:`InputError`
    naming the file.
    """
    from onnx.external_data_helper import ExternalDataInfo, _get_all_tensors

    target = Path(path)
    if not target.is_file():
        raise InputError(f"ONNX model {target} does not exist")
    try:
        model = onnx.load(str(target), load_external_data=False)
    except Exception as exc:  # noqa: BLE001 - protobuf raises DecodeError and friends
        raise InputError(f"{target} is not a readable ONNX model (truncated or corrupt?): "
                         f"{type(exc).__name__}: {exc}") from exc
    if not model.HasField("graph") or not model.graph.node:
        raise InputError(f"{target} holds no ONNX graph (truncated or not an ONNX file?)")
    external = False
    for tensor in _get_all_tensors(model):
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        external = True
        info = ExternalDataInfo(tensor)
        data_file = target.parent / info.location
        if not data_file.is_file():
            raise InputError(f"{target}: initializer '{tensor.name}' keeps its data in "
                             f"'{info.location}', which does not exist next to the model "
                             f"({data_file}); copy the data file along with the model")
        need = (info.offset or 0) + (info.length or 0)
        if info.length and data_file.stat().st_size < need:
            raise InputError(f"{target}: external data file {data_file} is truncated "
                             f"({data_file.stat().st_size} bytes, initializer '{tensor.name}' "
                             f"needs {need})")
    if external and lazy and tensor_bytes(model) >= LAZY_MIN_BYTES:
        _load_lazily(model, target.parent)
    elif external:
        try:
            onnx.load_external_data_for_model(model, str(target.parent))
        except Exception as exc:  # noqa: BLE001
            raise InputError(f"cannot read the external data of {target}: "
                             f"{type(exc).__name__}: {exc}") from exc
    ordered = sorted_topologically(model)
    try:
        if ordered is model:
            # By path: the checker reads external data itself, and a model over protobuf's
            # 2 GB limit cannot be checked as one in-memory proto.
            onnx.checker.check_model(str(target))
        else:  # the nodes were out of order: check the sorted graph
            onnx.checker.check_model(skeleton(ordered))
    except Exception as exc:  # noqa: BLE001 - ValidationError and C++ checker errors
        raise InputError(f"{target} is not a valid ONNX model: {exc}") from exc
    return ordered, external



# By path, external-data models of this many tensor bytes or more keep their large tensors on
# disk (``load_onnx(lazy=True)``); below it a copy is cheap and a whole proto is simpler for
# the caller (``materialized`` reads a lazy model in).
LAZY_MIN_BYTES = 1 << 28


def _load_lazily(model: onnx.ModelProto, base: Path) -> None:
    """Load the small external tensors of ``model``; mark the large ones lazy."""
    from onnx.external_data_helper import _get_all_tensors, load_external_data_for_tensor

    base_dir = str(base.resolve())
    for tensor in model.graph.initializer:
        if tensor.data_location == onnx.TensorProto.EXTERNAL and _is_param_init(tensor) \
                and int(np.prod(tensor.dims, dtype=np.int64)) > _SKELETON_KEEP:
            entry = tensor.external_data.add()
            entry.key, entry.value = LAZY_BASEPATH, base_dir
    for tensor in _get_all_tensors(model):
        if tensor.data_location != onnx.TensorProto.EXTERNAL or is_lazy(tensor):
            continue
        try:
            load_external_data_for_tensor(tensor, base_dir)
        except Exception as exc:  # noqa: BLE001
            raise InputError(f"cannot read the external data of initializer '{tensor.name}' "
                             f"from {base_dir}: {type(exc).__name__}: {exc}") from exc
        tensor.data_location = onnx.TensorProto.DEFAULT
        del tensor.external_data[:]


def has_lazy_tensors(model: onnx.ModelProto) -> bool:
    return any(is_lazy(t) for t in model.graph.initializer)


def materialized(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` itself, or a copy with its lazy tensors read into memory (for consumers
    that serialise it: ONNX Runtime from bytes, a single-file save)."""
    if not has_lazy_tensors(model):
        return model
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for t in out.graph.initializer:
        if is_lazy(t):
            t.CopyFrom(numpy_helper.from_array(tensor_array(t), t.name))
    return out


class TensorSpill:
    """A scratch data file that sliced or rewritten tensors are written to as they are made
    and referenced lazily (so a pass over a big model holds one tensor at a time);
    ``save_external`` then copies them into the output's data file. Remove it with
    ``close()`` (or use it as a context manager) once the model is saved."""

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        import secrets

        self.dir = Path(directory).resolve()
        self.dir.mkdir(parents=True, exist_ok=True)
        self.path: Path | None = self.dir / f".secateurs-spill-{secrets.token_hex(4)}.data"
        self._fh = open(self.path, "wb")  # noqa: SIM115 - closed by close()

    def put(self, tensor: onnx.TensorProto, arr: np.ndarray) -> None:
        """Write ``arr`` to the spill file and make ``tensor`` a lazy reference to it."""
        offset = self._fh.tell()
        _write_array(arr, self._fh)
        self._fh.flush()
        name = tensor.name
        tensor.Clear()
        tensor.name = name
        tensor.data_type = onnx.helper.np_dtype_to_tensor_dtype(arr.dtype)
        tensor.dims.extend(arr.shape)
        tensor.data_location = onnx.TensorProto.EXTERNAL
        for key, value in (("location", self.path.name), ("offset", str(offset)),
                           ("length", str(arr.nbytes)), (LAZY_BASEPATH, str(self.dir))):
            entry = tensor.external_data.add()
            entry.key, entry.value = key, value

    def seal(self, data_path: Path) -> str:
        """Stop writing and move the file to ``data_path`` (a save adopts it); returns the
        path its tensors refer to now."""
        self._fh.close()
        old = str(self.path)
        os.replace(self.path, data_path)
        self.path = data_path
        return old

    def keep(self) -> None:
        """The file is a saved model's data now: ``close`` leaves it."""
        self.path = None

    def close(self) -> None:
        from secateurs.runtime.io import _remove_quietly

        self._fh.close()
        if self.path is not None:
            _remove_quietly(self.path)

    def __enter__(self) -> TensorSpill:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def save_onnx(model: onnx.ModelProto, path: str | os.PathLike[str],
              external_data: bool | None = None, adopt: TensorSpill | None = None) -> Path:
    """Check (``full_check``) and write ``model`` atomically (temp file + ``os.replace``);
    ``external_data=True`` keeps tensors in a data file next to it. On error nothing is left."""
    from secateurs.runtime.io import atomic_save_onnx

    try:
        check_full(model)
    except Exception as exc:  # noqa: BLE001
        raise PlanError(f"refusing to write an invalid ONNX model: {exc}") from exc
    if external_data is None:
        external_data = tensor_bytes(model) > BIG_MODEL_BYTES
    if external_data:
        return save_external(model, path, adopt=adopt)
    return atomic_save_onnx(materialized(model), path, external_data=False)


# Above this many tensor bytes a model is handled as one that protobuf cannot serialise
# (its limit is 2 GiB): checks run on the skeleton, files keep external data.
BIG_MODEL_BYTES = 1_800_000_000


def tensor_bytes(model: onnx.ModelProto) -> int:
    """Bytes of the initializers' data (raw or typed fields), without serialising."""
    total = 0
    for t in model.graph.initializer:
        n = int(np.prod(t.dims, dtype=np.int64))
        size = onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize \
            if t.data_type != onnx.TensorProto.STRING else 1
        total += n * size
    return total


def save_external(model: onnx.ModelProto, path: str | os.PathLike[str],
                  size_threshold: int = 1024, adopt: TensorSpill | None = None) -> Path:
    """Write ``model`` with its tensors of ``size_threshold`` bytes or more in one data file
    next to it, atomically (``runtime.io``'s scheme: a fresh data file name, the model file's
    rename is the commit point), without a second copy of the weights in memory: each
    tensor's bytes are moved to the file and read back after the model file is written, lazy
    tensors are copied from their files (deferred ones computed) a tensor at a time, so
    ``model`` is unchanged afterwards. ``adopt``: a spill in the target's directory becomes
    the data file (its tensors are not copied; they then read from the written file)."""
    import secrets

    from secateurs.runtime.io import _external_locations, _remove_quietly, atomic_path

    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    previous = _external_locations(target) if target.exists() else set()
    location = f"{target.name}.{secrets.token_hex(4)}.data"
    data_path = target.parent / location
    moved: list[tuple[onnx.TensorProto, int, int]] = []
    relinked: list[tuple[onnx.TensorProto, list[tuple[str, str]]]] = []
    kept: list[onnx.TensorProto] = []  # adopted: they read from the written file after
    adopted = adopt.seal(data_path) if adopt is not None \
        and adopt.dir == target.parent.resolve() else None
    try:
        with open(data_path, "ab" if adopted else "wb") as fh:
            for tensor in model.graph.initializer:
                if adopted and is_lazy(tensor) and external_info(tensor)[0] == adopted:
                    _, offset, length = external_info(tensor)
                    _set_external(tensor, location, offset, length)
                    kept.append(tensor)
                    continue
                if is_lazy(tensor):  # copied from its file (or sliced now), one at a time
                    relinked.append((tensor, [(e.key, e.value) for e in tensor.external_data]))
                    offset = fh.tell()
                    if is_deferred(tensor):
                        _write_array(tensor_array(tensor), fh)
                    else:
                        _copy_bytes(*external_info(tensor), fh)
                    _set_external(tensor, location, offset, fh.tell() - offset)
                    continue
                if tensor.data_location == onnx.TensorProto.EXTERNAL \
                        or not tensor.HasField("raw_data") \
                        or len(tensor.raw_data) < size_threshold:
                    continue
                offset = fh.tell()
                data = tensor.raw_data
                fh.write(data)
                moved.append((tensor, offset, len(data)))
                del data
                tensor.ClearField("raw_data")
                _set_external(tensor, location, offset, moved[-1][2])
            fh.flush()
            os.fsync(fh.fileno())
        with atomic_path(target) as tmp:
            tmp.write_bytes(model.SerializeToString())
    except BaseException:
        _restore(moved, data_path)
        _relink(relinked)
        _remove_quietly(data_path)
        raise
    _restore(moved, data_path)
    _relink(relinked)
    if adopted:
        adopt.keep()  # type: ignore[union-attr]
        for tensor in kept:
            entry = tensor.external_data.add()
            entry.key, entry.value = LAZY_BASEPATH, str(target.parent.resolve())
    for stale in previous - {location}:
        if (target.parent / stale).parent == target.parent:
            _remove_quietly(target.parent / stale)
    return target


_COPY_CHUNK = 64 << 20


def _copy_bytes(src: str, offset: int, length: int, fh: Any) -> None:
    """Append ``length`` bytes of ``src`` from ``offset`` to ``fh``, a chunk at a time."""
    with open(src, "rb") as inp:
        inp.seek(offset)
        left = length
        while left:
            chunk = inp.read(min(left, _COPY_CHUNK))
            if not chunk:
                raise InputError(f"external data file {src} is truncated (needs "
                                 f"{offset + length} bytes)")
            fh.write(chunk)
            left -= len(chunk)


def _write_array(arr: np.ndarray, fh: Any) -> None:
    """Append ``arr``'s little-endian bytes to ``fh`` without a bytes copy of it."""
    arr = np.ascontiguousarray(arr)
    if arr.dtype.byteorder == ">":
        arr = arr.astype(arr.dtype.newbyteorder("<"))
    fh.flush()
    arr.tofile(fh)


def _set_external(tensor: onnx.TensorProto, location: str, offset: int, length: int) -> None:
    del tensor.external_data[:]
    tensor.data_location = onnx.TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", str(offset)),
                       ("length", str(length))):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value


def _relink(relinked: list[tuple[onnx.TensorProto, list[tuple[str, str]]]]) -> None:
    """Point the lazy tensors ``save_external`` re-pointed back at their source files."""
    for tensor, entries in relinked:
        del tensor.external_data[:]
        for key, value in entries:
            entry = tensor.external_data.add()
            entry.key, entry.value = key, value


def _restore(moved: list[tuple[onnx.TensorProto, int, int]], data_path: Path) -> None:
    """Put the bytes ``save_external`` moved to ``data_path`` back into their tensors."""
    if not moved:
        return
    with open(data_path, "rb") as fh:
        for tensor, offset, length in moved:
            fh.seek(offset)
            del tensor.external_data[:]
            tensor.ClearField("data_location")
            tensor.raw_data = fh.read(length)


# ---------------------------------------------------------------- tensors


def _copy(model: onnx.ModelProto, skip: set[str] | frozenset[str] = frozenset()
          ) -> onnx.ModelProto:
    """A copy of ``model``; initializers named in ``skip`` are left as empty placeholders (a
    prune writes their sliced values, so the full-size originals are never copied: peak
    memory is the original plus the pruned model, not two originals)."""
    out = onnx.ModelProto()
    if not skip:
        out.CopyFrom(model)
        return out
    _copy_fields(model, out, skip_field="graph")
    _copy_fields(model.graph, out.graph, skip_field="initializer")
    for init in model.graph.initializer:
        if init.name in skip:
            out.graph.initializer.add().name = init.name
        else:
            out.graph.initializer.append(init)
    return out


def _copy_fields(src: Any, dst: Any, skip_field: str) -> None:
    """Copy every set field of protobuf message ``src`` into ``dst`` but ``skip_field``."""
    for fd, value in src.ListFields():
        if fd.name == skip_field:
            continue
        if hasattr(value, "CopyFrom"):
            getattr(dst, fd.name).CopyFrom(value)
        elif hasattr(value, "extend"):  # a repeated field
            getattr(dst, fd.name).extend(value)
        else:
            setattr(dst, fd.name, value)


def _float_constants(graph: onnx.GraphProto) -> dict[str, onnx.NodeProto]:
    return {n.output[0]: n for n in graph.node if n.op_type == "Constant" and n.output
            and any(a.name == "value" for a in n.attribute)}


def _edit_tensors(model: onnx.ModelProto, plan: Plan, fn: Any,
                  source: onnx.ModelProto | None = None) -> None:
    """Replace every tensor the plan names by ``fn(array, dims)`` (initializer values read
    from ``source`` when given: ``model`` then holds placeholders, see ``_copy``). A lazy
    initializer (a big model loaded by path) becomes a deferred one: it is sliced when read
    or saved, one tensor at a time, never here."""
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    read = inits if source is None else {t.name: t for t in source.graph.initializer}
    consts = _float_constants(graph)
    inputs = {i.name: i for i in graph.input}
    for name, dims in plan.removed.items():
        if name in inits:
            tensor = read[name]
        elif name in consts:
            tensor = next(a for a in consts[name].attribute if a.name == "value").t
        else:
            raise PlanError(f"the plan removes slices of '{name}', which is neither an "
                            f"initializer nor a Constant of this model; was the plan made for "
                            f"another model?")
        shape = [int(s) for s in tensor.dims]
        for d, idx in dims.items():
            if not 0 <= int(d) < len(shape):
                raise PlanError(f"the plan removes dim {d} of '{name}', which has shape "
                                f"{shape}")
            if idx and (min(idx) < 0 or max(idx) >= shape[int(d)]):
                raise PlanError(f"the plan removes index {max(idx)} of dim {d} of '{name}' "
                                f"(size {shape[int(d)]})")
        if fn is _delete:
            for d, idx in dims.items():
                shape[int(d)] -= len(set(idx))
        if is_lazy(tensor):
            target = inits[name] if name in inits else tensor
            defer_tensor(target, tensor, functools.partial(fn, dims=dict(dims)), shape)
        else:
            new = numpy_helper.from_array(np.ascontiguousarray(fn(numpy_helper.to_array(
                tensor), dims)), name)
            if name in inits:
                inits[name].CopyFrom(new)
            else:
                tensor.CopyFrom(new)
        if name in inits and name in inputs:  # IR < 4: initializers are graph inputs too
            tt = inputs[name].type.tensor_type
            tt.ClearField("shape")
            for s in shape:
                tt.shape.dim.add().dim_value = s


def _delete(arr: np.ndarray, dims: Mapping[int, list[int]]) -> np.ndarray:
    for d, idx in sorted(dims.items()):
        keep = np.ones(arr.shape[int(d)], dtype=bool)
        keep[np.asarray(idx, dtype=np.int64)] = False
        arr = arr.take(np.nonzero(keep)[0], axis=int(d))  # np.delete sorts: 2x slower
    return arr


def _zero(arr: np.ndarray, dims: Mapping[int, list[int]]) -> np.ndarray:
    arr = arr.copy()
    for d, idx in dims.items():
        sl: list[Any] = [slice(None)] * arr.ndim
        sl[int(d)] = np.asarray(idx, dtype=np.int64)
        arr[tuple(sl)] = 0
    return arr


def zero_plan_slices_onnx(model: onnx.ModelProto, plan: Plan) -> onnx.ModelProto:
    """A copy of ``model`` with every slice the plan removes set to zero (the contract's
    reference)."""
    model, copies = untie_shared_vectors(model)  # the form the plan was made on
    out = model if copies else _copy(model)
    _edit_tensors(out, plan, _zero)
    return out


# ---------------------------------------------------------------- constants


# ---------------------------------------------------------------- shape-derived values
#
# Exporters compute many constants at run time from ``Shape`` of activations: reshape targets
# (``Concat(Gather(Shape(x), 0), 4, 16)``), chunk bounds (``Shape(x)[1] / 2``), the attention
# scale (``1 / sqrt(Shape(q)[-1])``). The analysis folds them at the plan's input shapes. After
# pruning, such a *live* chain would compute from the pruned widths, so every use of a live
# value by a node that is not itself folded (a *boundary use*) gets a *target*: the plan's new
# value where the plan rewrites that input (layout ops), else the value the analysis saw
# (data arithmetic such as the attention scale, slice bounds that must not move). Each element
# of the value is then compared at the analysed shapes with what the chain computes in the
# pruned model (``pruned``) and with what it computes at other sizes of the model's symbolic
# input dims (``dynamic``):
#
# * pruned == target: the chain stays live (a dynamic batch keeps flowing);
# * else, not dynamic: the element becomes the constant target;
# * else (dynamic and changed): a Reshape's one such element becomes ``-1``; otherwise the
#   element is rescaled, ``live * target / pruned`` (a product of a dynamic dim and a pruned
#   one, ``batch * heads``); a float or zero element cannot be and the apply refuses.


Use = tuple[int, int]  # (node index, input index)


def _drop_stale_value_info(model: onnx.ModelProto) -> None:
    """Widths changed: drop inferred shapes, except those of opaque custom-op outputs, which
    ONNX cannot infer and the analysis pinned (so they did not change). ONNX Runtime contrib
    ops with a channel rule may have changed width: their shapes go too (ORT infers them)."""
    custom = {o for n in model.graph.node if opaque_custom(n) for o in n.output}
    keep = [vi for vi in model.graph.value_info if vi.name in custom]
    del model.graph.value_info[:]
    model.graph.value_info.extend(keep)


def _live_values(graph: onnx.GraphProto, consts: Mapping[str, np.ndarray]) -> set[str]:
    """Folded values that the model computes at run time from the shape of a tensor."""
    live: set[str] = set()
    for node in graph.node:
        outs = [o for o in node.output if o]
        if not outs or not all(o in consts for o in outs):
            continue
        if node.op_type in ("Shape", "Size") and node.input and node.input[0] not in consts:
            live.update(outs)
        elif any(i in live for i in node.input):
            live.update(outs)
    return live


def _symbolic_dims(model: onnx.ModelProto) -> dict[str, list[int]]:
    """Graph input dims that are not static: {input: [dim index, ...]}."""
    from secateurs.graph.from_onnx import _dims, graph_input_names

    inputs = {i.name: i for i in model.graph.input}
    out = {}
    for name in graph_input_names(model.graph):
        dims = _dims(inputs[name].type) or []
        sym = [d for d, v in enumerate(dims) if not isinstance(v, int)]
        if sym:
            out[name] = sym
    return out


def _analysed_shapes(model: onnx.ModelProto, plan: Plan) -> dict[str, list[int]] | None:
    """The input shapes the plan was made at (``plan.meta['input_shapes']``)."""
    recorded = plan.meta.get("input_shapes")
    symbolic = _symbolic_dims(model)
    if recorded:
        return {str(k): [int(d) for d in v] for k, v in recorded.items()
                if k in {i.name for i in model.graph.input}}
    if symbolic:
        name = next(iter(symbolic))
        raise PlanError(f"input '{name}' of the model has dynamic dims {symbolic[name]} and the "
                        f"plan does not record the input shapes it was made at "
                        f"(meta['input_shapes']); make the plan with prune_onnx(..., "
                        f"input_shapes=...)")
    return None


def _fold_at(model: onnx.ModelProto,
             input_shapes: Mapping[str, Sequence[int]] | None) -> tuple[dict, dict]:
    """Shapes and folded values of ``model``'s weightless skeleton at ``input_shapes``."""
    work = with_input_shapes(skeleton(model), input_shapes)
    shapes = infer_shapes_folding(work)
    return shapes, fold_constants(work, shapes)


def _perturbed(shapes: Mapping[str, list[int]], symbolic: Mapping[str, list[int]],
               model: onnx.ModelProto, only: tuple[str, int] | None = None
               ) -> dict[str, list[int]]:
    """``shapes`` with every symbolic dim (or ``only`` one) one larger; a dim name shared by
    several inputs moves together."""
    from secateurs.graph.from_onnx import _dims

    inputs = {i.name: i for i in model.graph.input}
    out = {k: list(v) for k, v in shapes.items()}
    which = None
    if only is not None:
        which = (_dims(inputs[only[0]].type) or [])[only[1]]
    for name, dims in symbolic.items():
        sym = _dims(inputs[name].type) or []
        for d in dims:
            if only is None or (name, d) == only or (isinstance(which, str) and sym[d] == which):
                out[name][d] += 1
    return out


def _dynamic_consts(model: onnx.ModelProto, shapes: Mapping[str, list[int]]
                    ) -> list[dict[str, np.ndarray]]:
    """Folded values at other sizes of the model's symbolic input dims (all moved together,
    else each alone where together they do not infer)."""
    symbolic = _symbolic_dims(model)
    if not symbolic:
        return []
    trials = [None] + [(n, d) for n, ds in symbolic.items() for d in ds]
    out = []
    for only in trials:
        try:
            _, consts = _fold_at(model, _perturbed(shapes, symbolic, model, only))
        except Exception as exc:  # noqa: BLE001 - a size the model cannot run at: skip it
            log.debug("folding at perturbed input shapes %s failed: %s", only, exc)
            continue
        out.append(consts)
        if only is None:
            break
    return out


def _differs(a: np.ndarray | None, b: np.ndarray | None) -> np.ndarray | bool:
    """Per element: a != b (True everywhere when either is missing or the shapes differ)."""
    if a is None or b is None or a.shape != b.shape:
        return True
    return np.asarray(a != b)


class _Constants:
    """Reads and writes the constant inputs of nodes: initializers, Constant nodes, and live
    values computed from shapes (see the comment above)."""

    def __init__(self, model: onnx.ModelProto, original: onnx.ModelProto, plan: Plan) -> None:
        self.model = model
        self.graph = model.graph
        self.input_shapes = _analysed_shapes(original, plan)
        self.shapes, self.folded = _fold_at(original, self.input_shapes)
        self.live = _live_values(original.graph, self.folded)
        self.dynamic = _dynamic_consts(original, self.input_shapes or {}) \
            if self.live else []
        self.inits = {t.name: t for t in self.graph.initializer}
        self.consts = _float_constants(self.graph)
        self.at = -1  # index of the node being rewritten (protobuf wrappers have no stable id)
        self.taken = set(self.inits) | {o for n in self.graph.node for o in n.output} | \
            {i.name for i in self.graph.input}
        self.n_uses: dict[str, int] = {}
        for node in self.graph.node:
            for i in node.input:
                self.n_uses[i] = self.n_uses.get(i, 0) + 1
        for o in self.graph.output:
            self.n_uses[o.name] = self.n_uses.get(o.name, 0) + 1
        self.targets: dict[Use, np.ndarray] = {}
        self.replaced: list[str] = []
        self.inserted: dict[int, list[onnx.NodeProto]] = {}
        self.frozen = 0

    def value(self, name: str) -> np.ndarray | None:
        if name in self.inits:
            return tensor_array(self.inits[name])
        if name in self.consts:
            attr = next(a for a in self.consts[name].attribute if a.name == "value")
            return numpy_helper.to_array(attr.t)
        return self.folded.get(name)

    def write(self, node: onnx.NodeProto, index: int, arr: np.ndarray,
              at: int | None = None) -> None:
        """Give input ``index`` of ``node`` (node number ``at``, else the one being
        rewritten) the value ``arr`` at the analysed shapes."""
        at = self.at if at is None else at
        assert self.graph.node[at] == node
        self.targets[(at, index)] = np.asarray(arr)

    def _fresh(self, base: str) -> str:
        new, k = base, 1
        while new in self.taken:
            new, k = f"{base}_{k}", k + 1
        self.taken.add(new)
        return new

    def _set_input(self, node: onnx.NodeProto, index: int, new: str) -> None:
        while len(node.input) <= index:
            node.input.append("")
        if node.input[index]:
            self.replaced.append(node.input[index])
        node.input[index] = new

    def _write_constant(self, node: onnx.NodeProto, index: int, arr: np.ndarray) -> None:
        name = node.input[index] if index < len(node.input) else ""
        if name and self.n_uses.get(name, 0) == 1 and name not in self.live:
            if name in self.inits:
                self.inits[name].CopyFrom(numpy_helper.from_array(arr, name))
                return
            if name in self.consts:
                attr = next(a for a in self.consts[name].attribute if a.name == "value")
                attr.t.CopyFrom(numpy_helper.from_array(arr, attr.t.name))
                return
        new = self._fresh(f"{name or node.name or node.op_type}__pruned")
        init = numpy_helper.from_array(arr, new)
        self.graph.initializer.append(init)
        self.inits[new] = self.graph.initializer[-1]
        self._set_input(node, index, new)

    # live values -------------------------------------------------------------

    def freeze_live_uses(self) -> None:
        """Every boundary use of a live value that the plan does not rewrite keeps the value
        the analysis saw."""
        for i, node in enumerate(self.graph.node):
            outs = [o for o in node.output if o]
            if outs and all(o in self.folded for o in outs):
                continue  # part of a folded chain, not a boundary
            for j, name in enumerate(node.input):
                if name in self.live and (i, j) not in self.targets:
                    self.targets[(i, j)] = self.folded[name]

    def _pruned_values(self) -> dict[str, np.ndarray]:
        """The live chains' values in the pruned model at the analysed shapes (every boundary
        use given its target, so the shapes are the pruned ones)."""
        work = with_input_shapes(skeleton(self.model), self.input_shapes)
        _drop_stale_value_info(work)
        nodes = work.graph.node
        for k, ((i, j), arr) in enumerate(self.targets.items()):
            name = f"__secateurs_target_{k}"
            work.graph.initializer.append(numpy_helper.from_array(arr, name))
            while len(nodes[i].input) <= j:
                nodes[i].input.append("")
            nodes[i].input[j] = name
        try:
            shapes = infer_shapes_folding(work)
        except InputError as exc:
            raise PlanError(f"the pruned model does not infer shapes: {exc}") from exc
        return fold_constants(skeleton(self.model), shapes)

    def commit(self) -> None:
        """Write every target: constants, live chains kept, or rescaled."""
        live_uses = {u for u in self.targets
                     if self.graph.node[u[0]].input[u[1]:u[1] + 1] and
                     self.graph.node[u[0]].input[u[1]] in self.live}
        pruned = self._pruned_values() if live_uses else {}
        for (i, j), target in self.targets.items():
            node = self.graph.node[i]
            if (i, j) not in live_uses:
                self._write_constant(node, j, target)
                continue
            self._write_live(i, node, j, target, pruned.get(node.input[j]))
        if self.inserted:
            nodes = list(self.graph.node)
            del self.graph.node[:]
            for i, n in enumerate(nodes):
                self.graph.node.extend(self.inserted.get(i, []))
                self.graph.node.append(n)

    def _write_live(self, i: int, node: onnx.NodeProto, j: int, target: np.ndarray,
                    pruned: np.ndarray | None) -> None:
        name = node.input[j]
        where = f"input {j} ('{name}') of {node.op_type} '{node.name or node.op_type}'"
        changed = _differs(pruned, target)
        if not np.any(changed):
            return  # the chain computes the target: keep it live
        dynamic: np.ndarray | bool = False
        for other in self.dynamic:
            dynamic = dynamic | _differs(self.folded[name], other.get(name))
        if not np.any(dynamic):
            self.frozen += 1
            self._write_constant(node, j, target)
            return
        if pruned is None or pruned.shape != target.shape:
            raise PlanError(f"{where} is computed at run time from a dynamic input dim and "
                            f"from pruned widths, and its shape changes with the input; it "
                            f"cannot be kept dynamic. Prune with static input_shapes baked "
                            f"into the model (re-export it with static shapes)")
        self.frozen += 1
        self._rescale(i, node, j, target, pruned, np.broadcast_to(dynamic, target.shape),
                      np.broadcast_to(changed, target.shape), where)

    def _rescale(self, i: int, node: onnx.NodeProto, j: int, target: np.ndarray,
                 pruned: np.ndarray, dynamic: np.ndarray, changed: np.ndarray,
                 where: str) -> None:
        const = changed & ~dynamic
        scale = changed & dynamic
        target = target.copy()
        if node.op_type == "Reshape" and j == 1 and int(scale.sum()) == 1 \
                and not np.any(np.where(scale, False, target == -1)):
            target[scale] = -1  # Reshape infers the one dim that is both dynamic and pruned
            const, scale = const | scale, np.zeros_like(scale)
        if np.any(scale) and (not np.issubdtype(target.dtype, np.integer)
                              or np.any(pruned[scale] == 0)):
            raise PlanError(f"{where} is computed at run time from a dynamic input dim and "
                            f"from pruned widths ({pruned.tolist()} in the pruned model, "
                            f"{target.tolist()} wanted at the analysed shapes); it cannot be "
                            f"kept dynamic. Re-export the model with static shapes")
        base = node.name or node.op_type
        cur = node.input[j]
        made: list[onnx.NodeProto] = []

        def add_init(suffix: str, arr: np.ndarray) -> str:
            new = self._fresh(f"{base}__{suffix}")
            self.graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(arr),
                                                                  new))
            return new

        if np.any(scale):
            num = np.where(scale, target, 1).astype(target.dtype)
            den = np.where(scale, pruned, 1).astype(target.dtype)
            g = np.gcd(num, den)
            num, den = num // g, den // g
            mul = self._fresh(f"{base}__rescaled_mul")
            made.append(onnx.helper.make_node("Mul", [cur, add_init("num", num)], [mul],
                                              name=mul))
            div = self._fresh(f"{base}__rescaled")
            made.append(onnx.helper.make_node("Div", [mul, add_init("den", den)], [div],
                                              name=div))
            cur = div
        if np.any(const):
            out = self._fresh(f"{base}__pruned")
            made.append(onnx.helper.make_node(
                "Where", [add_init("mask", const), add_init("value", target), cur], [out],
                name=out))
            cur = out
        self.inserted.setdefault(i, []).extend(made)
        node.input[j] = cur


def _reshape_tokens(old: np.ndarray | None, new: list[int], out_dims: list[Any] | None,
                    allowzero: bool) -> list[int]:
    if old is None or len(old) != len(new):
        toks = list(new)
        dynamic = [i for i, d in enumerate(out_dims or []) if not isinstance(d, int)]
        if len(dynamic) == 1:
            toks[dynamic[0]] = -1
        return toks
    toks = []
    for i, (t, n) in enumerate(zip(old.tolist(), new)):
        out = (out_dims or [None] * len(new))[i]
        if t == n or t == -1:
            toks.append(int(t))
        elif t == 0 and not allowzero and (not isinstance(out, int) or out == n):
            toks.append(0)
        else:
            toks.append(int(n))
    return toks


def _expand_tokens(old: np.ndarray | None, new: list[int]) -> list[int]:
    if old is None:
        return list(new)
    lead = len(new) - len(old)
    return [int(t) if t in (1, new[lead + i]) else int(new[lead + i])
            for i, t in enumerate(old.tolist())]


def _attr(node: onnx.NodeProto, name: str, default: Any = None) -> Any:
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def _set_int_attr(node: onnx.NodeProto, name: str, value: Any) -> None:
    for i, a in enumerate(node.attribute):
        if a.name == name:
            del node.attribute[i]
            break
    node.attribute.append(onnx.helper.make_attribute(name, value))


def _opset(model: onnx.ModelProto) -> int:
    return next((int(o.version) for o in model.opset_import if o.domain in ("", "ai.onnx")), 13)


def _rewrite(node: onnx.NodeProto, consts: Mapping[str, Any], io: _Constants,
             opset: int) -> None:
    op = node.op_type
    if op == "Reshape" and "num_groups" in consts:
        _rewrite_group_norm_decomposition(node, consts, io)
    elif op == "Reshape" and "shape" in consts:
        old = io.value(node.input[1])
        toks = _reshape_tokens(None if old is None else old.reshape(-1),
                               [int(v) for v in consts["shape"]], io.shapes.get(node.output[0]),
                               bool(_attr(node, "allowzero", 0)))
        io.write(node, 1, np.asarray(toks, dtype=np.int64))
    elif op == "Expand" and "shape" in consts:
        old = io.value(node.input[1])
        toks = _expand_tokens(None if old is None else old.reshape(-1),
                              [int(v) for v in consts["shape"]])
        io.write(node, 1, np.asarray(toks, dtype=np.int64))
    elif op == "Split" and "sizes" in consts:
        sizes = np.asarray([int(v) for v in consts["sizes"]], dtype=np.int64)
        if opset >= 13:
            io.write(node, 1, sizes)
            for i, a in enumerate(node.attribute):
                if a.name == "num_outputs":
                    del node.attribute[i]
                    break
        else:
            _set_int_attr(node, "split", sizes.tolist())
    elif op == "Slice" and "items" in consts:
        _rewrite_slice(node, list(consts["items"]), io)
    elif op == "Gather" and "items" in consts:
        _rewrite_gather(node, list(consts["items"]), io)
    elif op == "Resize" and "shape" in consts and len(node.input) > 3 and node.input[3]:
        shape = [int(v) for v in consts["shape"]]
        axes = _attr(node, "axes", None)
        sizes = [shape[int(a)] for a in axes] if axes else shape
        io.write(node, 3, np.asarray(sizes, dtype=np.int64))
    elif op in ("Conv", "ConvTranspose") and "groups" in consts:
        _set_int_attr(node, "group", int(consts["groups"]))
    elif op == "GroupNormalization" and "num_groups" in consts:
        _set_int_attr(node, "num_groups", int(consts["num_groups"]))
    elif op in ("Attention", "MultiHeadAttention") and node.domain == MS_DOMAIN \
            and "num_heads" in consts:
        _set_int_attr(node, "num_heads", int(consts["num_heads"]))
        if "scale" in consts:
            _set_int_attr(node, "scale", float(consts["scale"]))


def _rewrite_group_norm_decomposition(node: onnx.NodeProto, consts: Mapping[str, Any],
                                      io: _Constants) -> None:
    """Whole groups removed from a GroupNorm that ``from_onnx`` recognised in its exporter
    decomposition (``group_norm_decompositions``): ``[N, G, K]`` → ``[N, G', K·(C'/G')/(C/G)]``,
    the uniform InstanceNormalization scale and bias keep ``G'`` entries, the reshape back
    takes ``C'`` channels."""
    norm_at = io.at
    index = {o: k for k, n in enumerate(io.graph.node) for o in n.output}
    inorm_at = index[node.input[0]]
    inorm = io.graph.node[inorm_at]
    split_at = index[inorm.input[0]]
    split = io.graph.node[split_at]
    groups, channels = int(consts["num_groups"]), int(consts["num_channels"])
    old_c = (io.shapes.get(split.input[0]) or [None, None])[1]
    first, back = io.value(split.input[1]), io.value(node.input[1])
    if first is None or back is None or not isinstance(old_c, int):
        raise PlanError(f"GroupNorm decomposition ending at Reshape '{node.name}': its shapes "
                        f"are computed at run time in a way secateurs cannot read")
    first, back = first.reshape(-1).copy(), back.reshape(-1).copy()
    old_g = int(io.shapes[split.output[0]][1])  # type: ignore[index]
    first[1] = groups
    if first[2] not in (-1, 0):
        first[2] = first[2] // (old_c // old_g) * (channels // groups)
    if back[1] not in (-1, 0):
        back[1] = channels
    io.write(split, 1, first, at=split_at)
    for j in (1, 2):
        arr = io.value(inorm.input[j])
        assert arr is not None
        io.write(inorm, j, np.ascontiguousarray(arr.reshape(-1)[:groups]), at=inorm_at)
    io.write(node, 1, back, at=norm_at)


def _rewrite_slice(node: onnx.NodeProto, items: list[Any], io: _Constants) -> None:
    attrs = _attr(node, "starts") is not None  # Slice-1 (opset < 10): bounds as attributes
    if attrs:
        starts = np.asarray(_attr(node, "starts"), np.int64)
        ends = np.asarray(_attr(node, "ends"), np.int64)
        axes_in = _attr(node, "axes")
        axes_in = None if axes_in is None else np.asarray(axes_in, np.int64)
    else:
        starts, ends = io.value(node.input[1]), io.value(node.input[2])
        if starts is None or ends is None:
            raise PlanError(f"Slice '{node.name}' has bounds computed at run time")
        axes_in = io.value(node.input[3]) if len(node.input) > 3 and node.input[3] else None
    starts, ends = starts.reshape(-1).copy(), ends.reshape(-1).copy()
    axes = np.arange(len(starts)) if axes_in is None else axes_in.reshape(-1)
    # ``from_onnx`` writes a one-position slice as ``int, None`` (a pinned index and the kept
    # axis): one entry per input dim again.
    items = [it for it in items if it is not None]
    rank = len(items)
    for k, ax in enumerate(axes.tolist()):
        it = items[int(ax) % rank]
        if isinstance(it, int):  # one position, ``int, None`` (see ``from_onnx``)
            starts[k], ends[k] = it, it + 1
            continue
        if not isinstance(it, slice):
            continue
        starts[k] = 0 if it.start is None else it.start
        if it.stop is not None:
            ends[k] = it.stop
    if attrs:
        _set_int_attr(node, "starts", [int(v) for v in starts])
        _set_int_attr(node, "ends", [int(v) for v in ends])
        return
    io.write(node, 1, starts)
    io.write(node, 2, ends)


def _rewrite_gather(node: onnx.NodeProto, items: list[Any], io: _Constants) -> None:
    """A constant Gather index (a scalar, or the positions of a take) at the positions that
    survive before it."""
    old = io.value(node.input[1])
    axis = int(_attr(node, "axis", 0))
    rank = len(items)
    it = items[axis % rank]
    if old is None or not (isinstance(it, int) or is_take(it)):
        raise PlanError(f"Gather '{node.name}': its index is computed at run time")
    new = np.asarray(it if isinstance(it, int) else list(it[1]), dtype=old.dtype)
    io.write(node, 1, new.reshape(old.shape))


def _drop_dead(model: onnx.ModelProto, roots: list[str]) -> None:
    """Remove nodes and initializers left without consumers after ``roots`` were replaced."""
    graph = model.graph
    outputs = {o.name for o in graph.output}
    candidates = set(roots)
    while candidates:
        used = {i for n in graph.node for i in n.input} | outputs
        dead = [n for n in graph.node if n.output and all(o not in used for o in n.output)
                and any(o in candidates for o in n.output)]
        dead_inits = [t for t in graph.initializer if t.name in candidates and t.name not in used]
        if not dead and not dead_inits:
            return
        candidates = {i for n in dead for i in n.input if i}
        for n in dead:
            graph.node.remove(n)
        for t in dead_inits:
            graph.initializer.remove(t)


def apply_plan_onnx(model: onnx.ModelProto, plan: Plan,
                    in_place: bool = False) -> onnx.ModelProto:
    """A pruned copy of ``model`` (never modified) following ``plan``; ``in_place=True``
    prunes ``model`` itself instead (no second copy of the weights: for a model the caller
    loaded privately, e.g. from a path)."""
    if not isinstance(plan, Plan):
        raise PlanError(f"expected a secateurs.Plan, got {type(plan).__name__}")
    if plan.frontend != "onnx":
        raise PlanError(f"this plan was made by the '{plan.frontend}' frontend; an ONNX model "
                        "needs a plan made from ONNX (its tensors are keyed by initializer "
                        "names)")
    # the form the plan was made on (prune_onnx analyses it): the exporter's deduplicated
    # per-channel vectors, one per reader; a copy made here is ours to prune in place
    model, copies = untie_shared_vectors(model, in_place=in_place)
    in_place = in_place or bool(copies)
    inits = {t.name for t in model.graph.initializer}
    if in_place:
        original, out = skeleton(model), model  # the original's shapes and constants
        io = _Constants(out, original, plan)
        _edit_tensors(out, plan, _delete)
    else:
        out = _copy(model, {n for n in plan.removed if n in inits})
        io = _Constants(out, model, plan)
        _edit_tensors(out, plan, _delete, source=model)
    order = {name: i for i, name in enumerate(onnx_node_names(out.graph))}
    opset = _opset(out)
    for node_name, consts in plan.constants.items():
        if node_name not in order:
            raise PlanError(f"the plan rewrites node '{node_name}', which this model lacks")
        io.at = order[node_name]
        _rewrite(out.graph.node[io.at], consts, io, opset)
    io.freeze_live_uses()
    io.commit()
    _drop_dead(out, io.replaced)
    retie(out, copies)  # copies the plan left equal to their source: shared again
    _drop_stale_value_info(out)
    custom = {o for n in out.graph.node if opaque_custom(n) for o in n.output}
    try:
        inferred = onnx.shape_inference.infer_shapes(skeleton(out), data_prop=True)
        weights = {t.name for t in out.graph.initializer}
        out.graph.value_info.extend(vi for vi in inferred.graph.value_info
                                    if vi.name not in weights and vi.name not in custom)
        check_full(out)
    except Exception as exc:  # noqa: BLE001 - checker and inference raise several types
        raise PlanError(f"the pruned model does not check: {type(exc).__name__}: {exc}") from exc
    return out


def check_full(model: onnx.ModelProto) -> None:
    """``onnx.checker.check_model(full_check=True)`` without serialising the weights twice:
    the structural check (initializer sizes included) on the model, the strict shape
    inference on its ``skeleton``. A model over protobuf's limit (``BIG_MODEL_BYTES``) cannot
    be handed to the checker whole: the structural check runs on the skeleton and every
    initializer's data size is checked against its dims here."""
    with _checkable(model):
        if tensor_bytes(model) > BIG_MODEL_BYTES or has_lazy_tensors(model):
            # a lazy tensor's file is not next to the working directory: the checker cannot
            # resolve it in memory
            _check_tensor_sizes(model)
            onnx.checker.check_model(skeleton(model), full_check=True)
            return
        onnx.checker.check_model(model)
        onnx.checker.check_model(skeleton(model), full_check=True)


UNCHECKED_DOMAIN = "secateurs.unchecked"


def _defined(op_type: str, opset: int) -> bool:
    """Whether ONNX defines ``op_type`` at ``opset`` (ORT also runs LayerNormalization below
    opset 17, where ONNX did not have it yet)."""
    try:
        onnx.defs.get_schema(op_type, opset, "")
    except onnx.defs.SchemaError:
        return False
    return True


@contextlib.contextmanager
def _checkable(model: onnx.ModelProto) -> Iterator[None]:
    """While the checker runs: default-domain ops ONNX does not define at the model's opset
    (ONNX Runtime registers ``SimplifiedLayerNormalization`` there, and ``LayerNormalization``
    below opset 17; its transformer optimizer writes both) moved to a domain the checker
    skips, in place (no copy of the weights), and put back after. Such a model fails the
    checker before any prune; everything else in it is still checked."""
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    moved = [n for n in model.graph.node
             if n.domain in ("", "ai.onnx") and not _defined(n.op_type, opset)]
    if not moved:
        yield
        return
    domains = [n.domain for n in moved]
    for n in moved:
        n.domain = UNCHECKED_DOMAIN
    model.opset_import.append(onnx.helper.make_opsetid(UNCHECKED_DOMAIN, 1))
    try:
        yield
    finally:
        for n, d in zip(moved, domains):
            n.domain = d
        del model.opset_import[len(model.opset_import) - 1]


def _check_tensor_sizes(model: onnx.ModelProto) -> None:
    for t in model.graph.initializer:
        lazy = is_lazy(t)
        if not lazy and (t.data_location == onnx.TensorProto.EXTERNAL
                         or not t.HasField("raw_data")):
            continue
        want = int(np.prod(t.dims, dtype=np.int64)) * \
            onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
        have = external_info(t)[2] if lazy else len(t.raw_data)
        if have != want:
            raise onnx.checker.ValidationError(
                f"initializer '{t.name}' holds {have} bytes, its dims "
                f"{list(t.dims)} need {want}")


def static_input_shapes(model: onnx.ModelProto) -> dict[str, tuple[int, ...] | None]:
    """Graph input shapes (None where a dim is not static)."""
    from secateurs.graph.from_onnx import _dims, graph_input_names

    inputs = {i.name: i for i in model.graph.input}
    return {n: _static(_dims(inputs[n].type)) for n in graph_input_names(model.graph)}
