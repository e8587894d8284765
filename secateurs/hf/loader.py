"""Save and reload pruned Hugging Face models so that the reload cannot be silently wrong.

A config describes a model only through what the architecture's constructor derives from it.
After pruning, some of what the pruned model holds is not what a constructor would derive:
head counts a config cannot say (BERT's ``hidden_size / num_heads``, CLIP's validator), per
layer widths, head sizes, scales, rotary dims, copies of the config held by submodules. No list
of attribute names per family can know all of them, so this module compares instead:

``loader_record(model)`` builds the architecture from the pruned config on ``meta`` (if the
constructor refuses that config, from the config with one attention head, a shape every
architecture accepts: the *build* overrides) and diffs it against the pruned model, module by
module:

* every parameter and buffer whose shape differs (``shapes``; given new storage before the
  checkpoint loads, so ``from_pretrained`` loads it unchanged);
* every plain attribute (numbers, strings, tuples/lists/dicts of them) that differs
  (``attrs``), including the fields of configs that submodules copied (T5's stacks);
* every non-persistent buffer or tensor attribute whose shape differs (``tensors``; they are
  not in the checkpoint, so ``save_pretrained`` here writes them to
  ``secateurs_tensors.safetensors`` — a directory without that file is refused on load);
* what the diff cannot express — a submodule the rebuild lacks or has of another type, a
  tensor the rebuild does not have — is a ``problem``: such a model cannot be saved.

``from_pretrained_pruned`` replays the record: build (with the build overrides), reshape,
load the checkpoint through ``from_pretrained`` (key renames, tying and dtypes stay in
transformers' hands), set the attributes and tensors, restore the pruned config values.

``save_pretrained(model, path, example_inputs)`` writes into a staging directory next to
``path``, reloads it through ``from_pretrained_pruned``, compares every buffer and attribute
with the in-memory model (non-persistent buffers whose values differ are added to the tensor
file, then it reloads again) and the outputs on the example inputs; only a round trip with
identical outputs is moved to ``path``. Otherwise the staging directory is removed, ``path`` is
left as it was, and the error names what differs.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from secateurs.errors import InputError, SecateursError
from secateurs.graph.fx_apply import tensor_slots

__all__ = ["LOADER", "TENSORS_FILE", "RoundTripError", "loader_record", "save_pretrained",
           "from_pretrained_pruned", "model_differences"]

LOADER = "secateurs.hf.from_pretrained_pruned"
FORMAT = 2
TENSORS_FILE = "secateurs_tensors.safetensors"
# config fields set to 1 when the constructor refuses the pruned config
_COUNT_ATTRS = ("num_attention_heads", "num_key_value_heads", "encoder_attention_heads",
                "decoder_attention_heads", "num_heads", "n_head", "n_heads")
_SCALARS = (bool, int, float, str, type(None))


class RoundTripError(SecateursError):
    """``save_pretrained`` refused: what it would write reloads to a different model."""


class _Opaque(Exception):
    """An attribute value the record cannot express."""


# ---------------------------------------------------------------- values the record can hold


def _encode(v: Any) -> Any:
    """A JSON value for a plain attribute (tuples tagged so they come back as tuples)."""
    if isinstance(v, _SCALARS):
        if isinstance(v, float) and not math.isfinite(v):
            return {"__float__": repr(v)}
        return v
    if isinstance(v, tuple):  # torch.Size too
        return {"__tuple__": [_encode(x) for x in v]}
    if isinstance(v, list):
        return [_encode(x) for x in v]
    if isinstance(v, dict) and all(isinstance(k, str) for k in v):
        return {"__dict__": {k: _encode(x) for k, x in v.items()}}
    raise _Opaque(type(v).__name__)


def _decode(v: Any) -> Any:
    if isinstance(v, list):
        return [_decode(x) for x in v]
    if isinstance(v, dict):
        if "__tuple__" in v:
            return tuple(_decode(x) for x in v["__tuple__"])
        if "__float__" in v:
            return float(v["__float__"])
        if "__dict__" in v:
            return {k: _decode(x) for k, x in v["__dict__"].items()}
    return v


def _same(a: Any, b: Any) -> bool:
    try:
        return _encode(a) == _encode(b)
    except _Opaque:
        return True  # not comparable here; the output check at save time covers it


def _is_config(v: Any) -> bool:
    return hasattr(v, "to_dict") and hasattr(v, "model_type") and not isinstance(v, nn.Module)


def _config_fields(cfg: Any) -> dict[str, Any]:
    out = {}
    for k, v in vars(cfg).items():
        if k.startswith("_") or k == "secateurs":
            continue
        with contextlib.suppress(_Opaque):
            out[k] = _encode(v)
    return out


# ---------------------------------------------------------------- the diff


def _build(model: nn.Module, overrides: Mapping[str, Any]) -> tuple[nn.Module | None, str]:
    cfg = copy.deepcopy(model.config)
    if hasattr(cfg, "secateurs"):
        del cfg.secateurs
    for attr, val in overrides.items():
        setattr(cfg, attr, val)
    try:
        if hasattr(cfg, "validate"):  # what save_pretrained runs (CLIP refuses 64 % 3 there)
            cfg.validate()
        with torch.device("meta"):
            return type(model)(cfg), ""
    except Exception as e:  # noqa: BLE001 - any constructor failure: try the build overrides
        return None, f"{type(model).__name__}(config) raises {type(e).__name__}: {e}"


def _tensor_attrs(mod: nn.Module) -> dict[str, torch.Tensor]:
    """Non-persistent buffers and plain tensor attributes of one module (not in a checkpoint)."""
    out = {k: v for k, v in mod._buffers.items()
           if v is not None and k in mod._non_persistent_buffers_set}
    out.update({k: v for k, v in vars(mod).items()
                if isinstance(v, torch.Tensor) and not k.startswith("_")})
    return out


def _module_attr_diff(name: str, mod: nn.Module, ref: nn.Module, top_config: Any,
                      problems: list[str]) -> dict[str, Any]:
    diff: dict[str, Any] = {}
    for k, v in vars(mod).items():
        if k.startswith("_") or k == "training" or isinstance(v, (torch.Tensor, nn.Module)):
            continue
        if _is_config(v):
            if v is top_config:
                continue
            r = getattr(ref, k, None)
            mine, theirs = _config_fields(v), _config_fields(r) if _is_config(r) else {}
            for field, val in mine.items():
                if theirs.get(field, object()) != val:
                    diff[f"{k}.{field}"] = val
            continue
        try:
            enc = _encode(v)
        except _Opaque:
            continue
        if not hasattr(ref, k):
            diff[k] = enc
            continue
        if not _same(v, getattr(ref, k)):
            diff[k] = enc
    return diff


def _diff(model: nn.Module, ref: nn.Module) -> tuple[dict, dict, list[str], list[str]]:
    """(shapes, attrs, tensors, problems) of ``model`` against the rebuilt ``ref``."""
    shapes: dict[str, list[int]] = {}
    tensors: list[str] = []
    problems: list[str] = []
    attrs: dict[str, dict[str, Any]] = {}
    ref_mods = dict(ref.named_modules(remove_duplicate=False))
    mods = dict(model.named_modules(remove_duplicate=False))
    for name in ref_mods.keys() - mods.keys():
        problems.append(f"the rebuilt model has a module '{name}' the pruned one lacks")
    for name, mod in mods.items():
        r = ref_mods.get(name)
        if r is None:
            problems.append(f"module '{name}' ({type(mod).__name__}) is not built by the config")
            continue
        if type(r).__name__ != type(mod).__name__:
            problems.append(f"module '{name}' is a {type(mod).__name__}, the config builds a "
                            f"{type(r).__name__}")
            continue
        prefix = f"{name}." if name else ""
        for kind, mine, theirs in (("parameter", mod._parameters, r._parameters),
                                   ("buffer", mod._buffers, r._buffers)):
            for k, t in mine.items():
                if t is None or (kind == "buffer" and k in mod._non_persistent_buffers_set):
                    continue  # non-persistent buffers: tensors, below
                rt = theirs.get(k)
                if rt is None:
                    problems.append(f"{kind} '{prefix}{k}' is not built by the config")
                elif tuple(rt.shape) != tuple(t.shape):
                    shapes[prefix + k] = list(t.shape)
        for k, t in _tensor_attrs(mod).items():
            rt = getattr(r, k, None)
            if not isinstance(rt, torch.Tensor) or tuple(rt.shape) != tuple(t.shape) or \
                    rt.dtype != t.dtype:
                tensors.append(prefix + k)
        d = _module_attr_diff(name, mod, r, model.config, problems)
        if d:
            attrs[name] = d
    return shapes, attrs, sorted(set(tensors)), problems


def loader_record(model: nn.Module, extra_tensors: list[str] | None = None
                  ) -> dict[str, Any] | None:
    """``config.secateurs`` for ``model``: what ``from_pretrained_pruned`` must do so that
    a rebuild from the config is the pruned model; None when a plain rebuild already is.
    ``problems`` lists what no record can express (``save_pretrained`` refuses those)."""
    reasons: list[str] = []
    build: dict[str, Any] = {}
    ref, why = _build(model, {})
    if ref is None:
        reasons.append(why)
        build = {a: 1 for a in _COUNT_ATTRS
                 if isinstance(getattr(model.config, a, None), int)
                 and a not in getattr(model.config, "attribute_map", {})}
        ref, why2 = _build(model, build)
        if ref is None:
            return {"loader": LOADER, "format": FORMAT, "reasons": reasons,
                    "problems": [f"the architecture refuses the pruned config ({why}) and the "
                                 f"config with one head ({why2})"],
                    "build": {}, "config": {}, "shapes": {}, "attrs": {}, "tensors": [],
                    "buffers": []}
    shapes, attrs, tensors, problems = _diff(model, ref)
    tensors = sorted(set(tensors) | set(extra_tensors or ()))
    buffers = [n for n in tensors if _is_buffer(model, n)]
    if not (build or shapes or attrs or tensors or problems):
        return None
    reasons += [f"{n}: {tuple(s)} but the config builds another shape" for n, s in
                list(shapes.items())[:3]]
    reasons += [f"{m or type(model).__name__}.{a} differs from what the config builds"
                for m, d in list(attrs.items())[:3] for a in list(d)[:2]]
    return {"loader": LOADER, "format": FORMAT, "reasons": reasons[:8], "problems": problems,
            "build": build, "config": {a: _encode(getattr(model.config, a)) for a in build},
            "shapes": shapes, "attrs": attrs, "tensors": tensors, "buffers": buffers}


def _is_buffer(model: nn.Module, name: str) -> bool:
    owner, _, attr = name.rpartition(".")
    mod = model.get_submodule(owner) if owner else model
    return attr in mod._buffers


# ---------------------------------------------------------------- replaying a record


def _resize(model: nn.Module, shapes: Mapping[str, list[int]]) -> None:
    """Give the named parameters/buffers new (uninitialised) storage of the recorded shapes;
    a tensor tied to several modules stays one tensor."""
    owners: dict[int, list[tuple[dict[str, Any], str]]] = {}
    for slots, attr, t in tensor_slots(model):
        owners.setdefault(id(t), []).append((slots, attr))
    named = dict(model.named_parameters(remove_duplicate=False))
    named.update(dict(model.named_buffers(remove_duplicate=False)))
    for name, shape in shapes.items():
        if name not in named:
            raise InputError(f"the recorded tensor '{name}' is not in the rebuilt "
                             f"{type(model).__name__}; was it saved by another version?")
        t = named[name]
        new = torch.empty(shape, dtype=t.dtype, device=t.device)
        if isinstance(t, nn.Parameter):
            new = nn.Parameter(new, requires_grad=t.requires_grad)
        for slots, attr in owners.get(id(t), []):
            slots[attr] = new


def _set_attrs(model: nn.Module, attrs: Mapping[str, Mapping[str, Any]]) -> None:
    for name, diff in attrs.items():
        mod = model.get_submodule(name) if name else model
        for key, val in diff.items():
            target, _, field = key.rpartition(".")
            obj = getattr(mod, target) if target else mod
            object.__setattr__(obj, field, _decode(val)) if isinstance(obj, nn.Module) \
                else setattr(obj, field, _decode(val))


def _set_tensor(model: nn.Module, name: str, value: torch.Tensor, buffer: bool) -> None:
    owner, _, attr = name.rpartition(".")
    mod = model.get_submodule(owner) if owner else model
    cur = getattr(mod, attr, None)
    device = cur.device if isinstance(cur, torch.Tensor) and cur.device.type != "meta" else \
        next((p.device for p in model.parameters()), torch.device("cpu"))
    value = value.to(device)
    if attr in mod._buffers:
        mod._buffers[attr] = value
    elif buffer:
        mod.register_buffer(attr, value, persistent=False)
    else:
        object.__setattr__(mod, attr, value)


def _pruned_class(cls: type, rec: Mapping[str, Any]) -> type:
    """``cls`` whose constructor gives the recorded tensors their pruned shapes, so
    ``from_pretrained`` loads the pruned checkpoint as it is. Same class name, so a re-save
    keeps it."""

    def __init__(self, config, *args, **kwargs):
        cls.__init__(self, config, *args, **kwargs)
        _resize(self, rec["shapes"])

    return type(cls.__name__, (cls,), {"__init__": __init__, "__module__": cls.__module__,
                                       "__qualname__": cls.__qualname__})


def _model_class(config: Any, model_class: Any) -> Any:
    import transformers

    if model_class is not None:
        return model_class
    name = (config.architectures or ["AutoModel"])[0]
    cls = getattr(transformers, name, None)
    if cls is None:
        raise InputError(f"config.architectures names {name!r}, which transformers does not "
                         "export; pass model_class=")
    return cls


def from_pretrained_pruned(path: str | os.PathLike[str], model_class: Any = None,
                           **kwargs: Any) -> nn.Module:
    """Load a model saved after ``prune_hf``: plain ``from_pretrained`` when its config
    describes it, else replay ``config.secateurs`` (see the module docstring). ``kwargs`` go
    to ``from_pretrained`` (``dtype``, ...)."""
    from transformers import AutoConfig

    path = str(path)
    config = AutoConfig.from_pretrained(path)
    cls = _model_class(config, model_class)
    rec = getattr(config, "secateurs", None)
    if not rec:
        return cls.from_pretrained(path, config=config, **kwargs).eval()
    if rec.get("loader") != LOADER or rec.get("format") != FORMAT:
        raise InputError(f"{path}: config.secateurs was written by another version of "
                         f"secateurs (format {rec.get('format')!r}, this one reads {FORMAT}); "
                         "prune and save again with this version")
    if rec.get("problems"):
        raise InputError(f"{path}: the pruned model cannot be rebuilt from its config: "
                         f"{rec['problems'][0]}")
    tensors: dict[str, torch.Tensor] = {}
    if rec["tensors"]:
        file = os.path.join(path, TENSORS_FILE)
        if not os.path.exists(file):
            raise InputError(
                f"{path}: the record needs the tensors {rec['tensors'][:3]} (not part of a "
                f"checkpoint) from {TENSORS_FILE}, which is missing: the directory was written "
                "by plain save_pretrained. Save it with secateurs.hf.save_pretrained.")
        from safetensors.torch import load_file

        tensors = load_file(file)
        missing = [n for n in rec["tensors"] if n not in tensors]
        if missing:
            raise InputError(f"{path}/{TENSORS_FILE} lacks {missing[:3]}")
    real = {a: _decode(v) for a, v in rec["config"].items()}
    for a, v in rec["build"].items():
        setattr(config, a, v)
    model = _pruned_class(cls, rec).from_pretrained(path, config=config, **kwargs)
    for a, v in real.items():
        setattr(model.config, a, v)
    _set_attrs(model, rec["attrs"])
    for name in rec["tensors"]:
        _set_tensor(model, name, tensors[name], name in rec.get("buffers", ()))
    return model.eval()


# ---------------------------------------------------------------- a save that is checked


def model_differences(a: nn.Module, b: nn.Module, limit: int = 8) -> list[str]:
    """What differs between two models of one architecture: structure, tensor shapes and
    values (parameters, buffers, tensor attributes), plain module attributes."""
    out: list[str] = []
    mb = dict(b.named_modules(remove_duplicate=False))
    for name, ma in a.named_modules(remove_duplicate=False):
        r = mb.get(name)
        where = name or type(a).__name__
        if r is None or type(r).__name__ != type(ma).__name__:
            out.append(f"module '{where}' missing or of another type after reload")
            continue
        ta = {**ma._parameters, **ma._buffers, **_tensor_attrs(ma)}
        tb = {**r._parameters, **r._buffers, **_tensor_attrs(r)}
        for k, t in ta.items():
            u = tb.get(k)
            if t is None:
                continue
            if u is None or tuple(u.shape) != tuple(t.shape):
                out.append(f"tensor '{where}.{k}': {tuple(t.shape)} vs "
                           f"{None if u is None else tuple(u.shape)}")
            elif t.device.type != "meta" and u.device.type != "meta" and \
                    not torch.equal(t.detach().cpu(), u.detach().cpu().to(t.dtype)):
                out.append(f"tensor '{where}.{k}' has other values")
        for k, v in _module_attr_diff(name, ma, r, a.config, []).items():
            out.append(f"attribute '{where}.{k}' = {_decode(v)!r} vs "
                       f"{getattr(r, k, '<missing>')!r}")
        if len(out) >= limit:
            break
    return out[:limit]


def _non_persistent(model: nn.Module, names: list[str]) -> list[str]:
    """The tensors among ``names`` that a checkpoint does not carry."""
    out = []
    for full in names:
        owner, _, attr = full.rpartition(".")
        with contextlib.suppress(AttributeError):
            mod = model.get_submodule(owner) if owner else model
            if attr in _tensor_attrs(mod):
                out.append(full)
    return out


@contextlib.contextmanager
def _build_values(config: Any, rec: Mapping[str, Any] | None) -> Iterator[None]:
    """Write the build overrides into ``config`` while it is serialised (the architecture's
    validator may refuse the real pruned values, e.g. CLIP with 64 % 3); restore after."""
    if not rec or not rec.get("build"):
        yield
        return
    real = {a: getattr(config, a) for a in rec["build"]}
    try:
        for a, v in rec["build"].items():
            setattr(config, a, v)
        yield
    finally:
        for a, v in real.items():
            setattr(config, a, v)


def _outputs(model: nn.Module, inputs: Any) -> list[torch.Tensor]:
    from secateurs.passes.calibration import call_batch

    with torch.no_grad():
        out = call_batch(model, inputs)
    if isinstance(out, torch.Tensor):
        return [out]
    vals = out.values() if isinstance(out, Mapping) else out
    return [v for v in vals if isinstance(v, torch.Tensor)]


def _commit(stage: Path, target: Path) -> None:
    """Move the verified staging directory to ``target`` (a rename within one directory; an
    existing directory is moved aside first and removed after)."""
    if target.exists() and not target.is_dir():
        raise InputError(f"{target} exists and is not a directory")
    old = None
    if target.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old.", dir=target.parent))
        os.rmdir(old)
        os.replace(target, old)
    os.replace(stage, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def save_pretrained(model: Any, path: str | os.PathLike[str], example_inputs: Any = None, *,
                    rtol: float = 1e-5, atol: float = 1e-6, **kwargs: Any) -> Path:
    """``model.save_pretrained(path)`` for a pruned model (an ``HFPruneResult`` or its model),
    checked: the directory is staged, reloaded with ``from_pretrained_pruned`` and compared
    (tensors, attributes, outputs on ``example_inputs`` — default: the result's); only an
    identical round trip replaces ``path``. Raises ``RoundTripError`` naming the difference
    otherwise (``path`` is then untouched). ``kwargs`` go to ``save_pretrained``."""
    result = model if hasattr(model, "plan") and hasattr(model, "model") else None
    if result is not None:
        model = result.model
        if example_inputs is None:
            example_inputs = getattr(result, "example_inputs", None)
    if example_inputs is None:
        raise InputError("save_pretrained needs example_inputs to check the round trip "
                         "(tuple of positional arguments or a dict, as for prune_hf)")
    if any(p.is_meta for p in model.parameters()):
        raise InputError("the model's weights are on the meta device; write a pruned "
                         "checkpoint with secateurs.hf.shards.prune_checkpoint instead")
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    cfg = model.config
    if hasattr(cfg, "secateurs"):
        del cfg.secateurs
    rec = loader_record(model)
    if rec is not None and rec["problems"]:
        raise RoundTripError(f"{type(model).__name__} cannot be saved so that it reloads as "
                             f"it is: {rec['problems'][0]}; nothing was written to {target}")
    stage = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        for _ in range(2):
            if rec is not None:
                cfg.secateurs = rec
            with _build_values(cfg, rec):
                model.save_pretrained(stage, **kwargs)
            if rec is not None and rec["tensors"]:
                from safetensors.torch import save_file

                named = {n: _lookup(model, n).detach().contiguous().cpu()
                         for n in rec["tensors"]}
                save_file(named, str(stage / TENSORS_FILE))
            back = from_pretrained_pruned(stage, type(model))
            diffs = model_differences(model, back, limit=64)
            values = [d.split("'")[1].removeprefix(f"{type(model).__name__}.") for d in diffs
                      if d.startswith("tensor '") and d.endswith("other values")]
            fixable = _non_persistent(model, values)
            if not fixable or (rec is not None and set(fixable) <= set(rec["tensors"])):
                break
            rec = loader_record(model, extra_tensors=fixable + list(rec["tensors"] if rec
                                                                    else ()))
        problem = _compare(model, back, example_inputs, diffs, rtol, atol)
        if problem:
            raise RoundTripError(f"{type(model).__name__} saved to {target} would reload "
                                 f"differently ({problem}); nothing was written")
        _commit(stage, target)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    return target


def _lookup(model: nn.Module, name: str) -> torch.Tensor:
    owner, _, attr = name.rpartition(".")
    return getattr(model.get_submodule(owner) if owner else model, attr)


def _compare(model: nn.Module, back: nn.Module, inputs: Any, diffs: list[str], rtol: float,
             atol: float) -> str:
    mine, theirs = _outputs(model.eval(), inputs), _outputs(back, inputs)
    if len(mine) != len(theirs):
        return f"{len(theirs)} outputs instead of {len(mine)}"
    for i, (a, b) in enumerate(zip(mine, theirs)):
        if a.shape != b.shape:
            return f"output {i} has shape {tuple(b.shape)} instead of {tuple(a.shape)}"
        if not torch.allclose(a.float(), b.float(), rtol=rtol, atol=atol):
            err = float((a.float() - b.float()).abs().max())
            what = "; ".join(diffs[:3]) or "no tensor or plain attribute differs: something " \
                "the record cannot see (a code path, an opaque attribute)"
            return f"output {i} differs by up to {err:.3g}; {what}"
    return ""


def record_json(rec: Mapping[str, Any]) -> str:
    """The record as written into config.json (for logs and tests)."""
    return json.dumps(rec, indent=1, sort_keys=True)
