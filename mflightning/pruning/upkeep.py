"""Mask upkeep: keep pruned weights at exactly zero while a model trains. Pure torch, no Lightning.

`MaskKeeper` holds one bool mask (True = kept) per pruned parameter and does the three things
training needs, each with one fused multi-tensor call per (device, dtype) group on accelerators
(on CPU, through a small reusable integer buffer, which is faster than casting a bool mask per element).
Pruned entries become exactly zero whatever they held (NaN, inf): the mask multiplies the tensor's
bits viewed as integers, a masked fill at the speed of a multiply:
- `zero_gradients(optimizer)`: before a step (and before gradient clipping), so clipping and the
  optimizer's state only ever see a sparse gradient;
- `zero_weights(optimizer)`: after every real step (`attach` registers it as a step post-hook, so a
  step the AMP scaler skips never calls it), so weight decay, momentum carried in a checkpoint or
  any other write cannot revive a pruned weight;
- `measured_sparsity()`: the exact zeros of the masked weights, per group.

Copies of masked weights take their source's masks so that no copy revives a pruned weight: the
copies the model declares (`pruning_copies`, e.g. momentum encoders; see `naming.declared_copies`)
from the start, and any other module holding a copy (an EMA model) once `follow` is called on it.
Copies are zeroed with the masked weights (`zero_weights()`, or `zero_copies()` after an update
made outside an optimizer) and never counted in the sparsity figures or the saved masks.

Parameters that join an optimizer at any time (`add_param_group`, Lightning's `BaseFinetuning`) are
masked from their first step: an optimizer's parameter list is re-read whenever its groups change.
Parameters sharded as DTensors (FSDP2 `fully_shard`) keep their mask sharded the same way (one byte
per local weight); `full_masks()` gathers them (a collective: call it on every rank).
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from .naming import copy_sources, declared_copies

try:  # torch >= 2.4
    from torch.distributed.tensor import DTensor, distribute_tensor
except ImportError:  # pragma: no cover - older torch without public DTensor
    DTensor = None  # type: ignore[assignment,misc]
    distribute_tensor = None  # type: ignore[assignment]

try:  # torch >= 2.6
    from torch.distributed.fsdp import FSDPModule
except ImportError:  # pragma: no cover
    FSDPModule = None  # type: ignore[assignment,misc]

ReduceFn = Callable[[Tensor], Tensor]


def reshard(model: nn.Module) -> None:
    """Put every FSDP2 module of `model` back into its sharded state (a local operation).

    A forward without backward (calibration, validation) leaves the root FSDP2 module unsharded: its
    `named_parameters()` are then full tensors whose storage FSDP2 frees at the next reshard, not
    the sharded parameters the optimizer updates. Masks must be bound to the sharded ones.
    """
    if FSDPModule is None:
        return
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def is_dtensor(tensor: Any) -> bool:
    """True for a `torch.distributed.tensor.DTensor` (a sharded FSDP2 parameter or gradient)."""
    return DTensor is not None and isinstance(tensor, DTensor)


def local(tensor: Tensor) -> Tensor:
    """The tensor this process stores: the local shard of a DTensor, else the tensor itself."""
    return tensor.to_local() if is_dtensor(tensor) else tensor


def full_tensor(tensor: Tensor) -> Tensor:
    """The whole tensor: gathered for a DTensor (a collective), else the tensor itself."""
    return tensor.full_tensor() if is_dtensor(tensor) else tensor


def shard_like(mask: Tensor, param: Tensor) -> Tensor:
    """This process's part of a full-shape `mask`, laid out like `param` (all of it unless a DTensor)."""
    if tuple(mask.shape) != tuple(param.shape):
        raise ValueError(f"mask shape {tuple(mask.shape)} does not match the parameter's {tuple(param.shape)}")
    if not is_dtensor(param):
        return mask.to(param.device, torch.bool)
    device = param.to_local().device
    # every rank holds the same full mask, so each takes its own shard without communication
    sharded = distribute_tensor(mask.to(device, torch.uint8), param.device_mesh, param.placements, src_data_rank=None)
    return sharded.to_local().bool()


class MaskKeeper:
    """Pruned weights of `model` kept at exactly zero; see the module docstring.

    Args:
        model: the module whose parameters are masked (names as in `model.named_parameters()`).
        masks: parameter name -> bool tensor of the parameter's full shape, True = kept.
        groups: parameter name -> group name, for `measured_sparsity` (default: one group `all`).
        copies: also mask the copies `model` declares (`pruning_copies`) with their sources' masks.
    """

    def __init__(self, model: nn.Module, masks: Mapping[str, Tensor], groups: Mapping[str, str] | None = None,
                 *, copies: bool = True):
        reshard(model)  # bind the masks to the parameters the optimizer updates (sharded under FSDP2)
        params = dict(model.named_parameters())
        unknown = [name for name in masks if name not in params]
        if unknown:
            raise ValueError(f"{len(unknown)} mask(s) name no parameter of the model (first: {unknown[:3]})")
        self.params: dict[str, nn.Parameter] = {name: params[name] for name in masks}
        self.masks: dict[str, Tensor] = {}
        for name, mask in masks.items():
            try:
                self.masks[name] = shard_like(mask, params[name])
            except ValueError as err:
                raise ValueError(f"mask for {name!r}: {err}") from None
        self.groups: dict[str, str] = {name: (groups or {}).get(name, "all") for name in masks}
        self._by_optimizer: dict[int, tuple[tuple, list[tuple[nn.Parameter, Tensor]]]] = {}
        self._handles: list[Any] = []
        self._buffers: dict[torch.dtype, Tensor] = {}  # CPU integer buffers of `_fused_mul`
        # copies of masked weights: label -> (parameter, local mask); `_copy_of`: model name -> source name
        self.copies: dict[str, tuple[nn.Parameter, Tensor]] = {}
        self._copy_of: dict[str, str] = {}
        if copies:
            rules = declared_copies(model)
            if rules:
                sources = copy_sources(params, rules, lambda n: n in self.masks, where=type(model).__name__)
                for name, source in sources.items():
                    self._add_copy(name, params[name], source)
                    self._copy_of[name] = source

    # ------------------------------------------------------------------ copies
    def follow(self, module: nn.Module, rules: Mapping[str, str] | None = None, label: str = "") -> int:
        """Mask the parameters of `module` that copy masked parameters; returns how many.

        `rules` maps prefixes of `module`'s names to prefixes of the model's (copy -> source); None:
        `module` is a copy of the whole model under the same names (an EMA model), including the
        copies the model declares. Shapes must agree. The copies are zeroed at once.
        """
        masked = lambda n: n in self.masks or n in self._copy_of  # noqa: E731
        reshard(module)
        named = dict(module.named_parameters())
        if rules is None:
            sources = {name: name for name in named if masked(name)}
        else:
            sources = copy_sources(named, rules, masked, where=label or type(module).__name__)
        added, known = [], {id(p) for p, _ in self._all_pairs()}
        for name, source in sources.items():
            param = named[name]
            if id(param) in known:  # already masked (the model itself, or a copy followed before)
                continue
            added.append(self._add_copy(f"{label}{name}", param, self._copy_of.get(source, source)))
        with torch.no_grad():
            _fused_mul([(local(p), kept) for p, kept in added], self._buffers)
        return len(added)

    def _add_copy(self, label: str, param: nn.Parameter, source: str) -> tuple[nn.Parameter, Tensor]:
        full = self._full_mask(source)
        if tuple(param.shape) != tuple(full.shape):
            raise ValueError(f"copy {label!r} {tuple(param.shape)} does not match the shape of {source!r} "
                             f"{tuple(full.shape)}, whose mask it should take")
        self.copies[label] = (param, shard_like(full, param))
        self._by_optimizer = {}
        return self.copies[label]

    def _full_mask(self, name: str) -> Tensor:
        kept, param = self.masks[name], self.params[name]
        if not is_dtensor(param):
            return kept
        sharded = DTensor.from_local(kept.to(torch.uint8), param.device_mesh, param.placements, shape=param.shape,
                                     stride=param.stride())
        return sharded.full_tensor().bool()  # a collective: every rank follows the same copies

    def zero_copies(self) -> None:
        """Zero the pruned entries of every copy (after an update made outside an optimizer, e.g. EMA)."""
        with torch.no_grad():
            _fused_mul([(local(p), kept) for p, kept in self.copies.values()], self._buffers)

    # ------------------------------------------------------------------ the exact part
    def zero_weights(self, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Zero the pruned entries of the parameters `optimizer` updates (all masked ones and copies if None)."""
        pairs = self._pairs(optimizer) if optimizer is not None else self._all_pairs()
        with torch.no_grad():
            _fused_mul([(local(p), kept) for p, kept in pairs], self._buffers)

    def zero_gradients(self, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Zero the gradients of pruned entries (parameters without a gradient are skipped)."""
        pairs = self._pairs(optimizer) if optimizer is not None else self._all_pairs()
        # exact zeros: AMP's scaler has already looked for infs (in `unscale_`, before this hook runs)
        with torch.no_grad():
            _fused_mul([(local(p.grad), kept) for p, kept in pairs if p.grad is not None], self._buffers)

    # ------------------------------------------------------------------ optimizers
    def attach(self, optimizer: torch.optim.Optimizer) -> None:
        """Re-zero pruned weights after every real step of `optimizer` (a step post-hook)."""
        optimizer = _unwrap(optimizer)
        self._handles.append(optimizer.register_step_post_hook(lambda opt, args, kwargs: self.zero_weights(opt)))

    def detach(self) -> None:
        """Remove every hook `attach` registered."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._by_optimizer = {}

    def _pairs(self, optimizer: Any) -> list[tuple[nn.Parameter, Tensor]]:
        """(parameter, local kept mask) for the masked parameters this optimizer updates now."""
        optimizer = _unwrap(optimizer)
        # the groups' list objects and lengths: `add_param_group` or a rebuilt group changes it
        signature = tuple((id(g["params"]), len(g["params"])) for g in optimizer.param_groups)
        cached = self._by_optimizer.get(id(optimizer))
        if cached is None or cached[0] != signature:
            updated = {id(p) for group in optimizer.param_groups for p in group["params"]}
            pairs = [pair for pair in self._all_pairs() if id(pair[0]) in updated]
            cached = self._by_optimizer[id(optimizer)] = (signature, pairs)
        return cached[1]

    def _all_pairs(self) -> list[tuple[nn.Parameter, Tensor]]:
        return list(zip(self.params.values(), self.masks.values())) + list(self.copies.values())

    # ------------------------------------------------------------------ figures and state
    def measured_sparsity(self, reduce: ReduceFn | None = None) -> dict[str, float]:
        """Fraction of exact zeros in the masked weights per group and `total` (reads the weights).

        With sharded parameters pass `reduce` (an in-place sum over processes) to count every shard.
        """
        names = list(dict.fromkeys(self.groups.values()))
        counts = torch.zeros(2 * len(names), dtype=torch.float64)
        index = {g: i for i, g in enumerate(names)}
        # zeros counted on the weights' device and read back once: no host sync per layer on accelerators
        device = local(next(iter(self.params.values()))).device if self.params else torch.device("cpu")
        zeros = torch.zeros(len(names), dtype=torch.int64, device=device)
        for name, param in self.params.items():
            w = local(param.detach())
            i = index[self.groups[name]]
            zeros[i] += (w == 0).sum().to(device)
            counts[2 * i + 1] += w.numel()
        counts[0::2] = zeros.cpu().double()
        if reduce is not None:
            device = next(iter(self.masks.values())).device if self.masks else torch.device("cpu")
            counts = reduce(counts.to(device)).cpu()
        figures = {g: float(counts[2 * i] / max(1.0, float(counts[2 * i + 1]))) for g, i in index.items()}
        figures["total"] = float(counts[0::2].sum() / max(1.0, float(counts[1::2].sum())))
        return figures

    def numel(self) -> dict[str, int]:
        """Masked weights per group (full, unsharded sizes)."""
        sizes: dict[str, int] = {}
        for name, param in self.params.items():
            sizes[self.groups[name]] = sizes.get(self.groups[name], 0) + param.numel()
        return sizes

    def full_masks(self) -> dict[str, Tensor]:
        """Every mask at its parameter's full shape, on CPU (gathers sharded masks: call on all ranks)."""
        out = {}
        for name, kept in self.masks.items():
            param = self.params[name]
            if is_dtensor(param):
                sharded = DTensor.from_local(
                    kept.to(torch.uint8), param.device_mesh, param.placements, shape=param.shape, stride=param.stride()
                )
                kept = sharded.full_tensor().bool()
            out[name] = kept.cpu()
        return out


def _unwrap(optimizer: Any) -> torch.optim.Optimizer:
    """The torch optimizer behind a Lightning `LightningOptimizer`."""
    return getattr(optimizer, "optimizer", optimizer)


# Pruned entries are set to exactly zero whatever they held (NaN and inf included), kept entries are
# left bit for bit: the tensor's bits, viewed as a same-width integer, are multiplied by the 0/1 mask
# (a masked fill, at the cost of a multiply; `masked_fill_` is 10-20x slower on CPU, and a float
# multiply leaves NaN * 0 = NaN). On CPU the mask is first copied into a reusable integer buffer, a
# vectorised cast (multiplying by a bool tensor casts element by element, ~2.5x slower).
_CPU_CHUNK = 1 << 20  # elements per buffer pass: a 4 MB int32 buffer, however large the layer
_BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}  # itemsize -> integer of that width


def _as_bits(tensor: Tensor) -> Tensor:
    """A floating tensor's storage as integers of the same width (zero bits = +0.0); others as they are."""
    width = _BITS.get(tensor.element_size()) if tensor.dtype.is_floating_point else None
    return tensor.view(width) if width is not None else tensor


def _fused_mul(pairs: Iterable[tuple[Tensor, Tensor]], buffers: dict[torch.dtype, Tensor] | None = None) -> None:
    """Zero the entries of every tensor where its mask is False, exactly (see above): one
    `torch._foreach_mul_` per (device, dtype) group on accelerators; on CPU through a reusable integer
    buffer (`buffers`, one per width, kept by the caller)."""
    grouped: dict[tuple[torch.device, torch.dtype], tuple[list[Tensor], list[Tensor]]] = {}
    for tensor, mask in pairs:
        bits = _as_bits(tensor)
        tensors, masks = grouped.setdefault((bits.device, bits.dtype), ([], []))
        tensors.append(bits)
        masks.append(mask)
    for (device, dtype), (tensors, masks) in grouped.items():
        if device.type != "cpu" or dtype == torch.bool:
            torch._foreach_mul_(tensors, masks)
            continue
        store = buffers if buffers is not None else {}
        buffer = store.get(dtype)
        if buffer is None:
            buffer = store[dtype] = torch.empty(_CPU_CHUNK, dtype=dtype)
        for tensor, mask in zip(tensors, masks):
            _cpu_mul(tensor, mask, buffer)


def _cpu_mul(tensor: Tensor, mask: Tensor, buffer: Tensor) -> None:
    if not tensor.is_contiguous() or not mask.is_contiguous():
        tensor.mul_(mask)
        return
    flat, bits = tensor.view(-1), mask.view(-1).view(torch.uint8)
    for start in range(0, flat.numel(), buffer.numel()):
        part = flat[start : start + buffer.numel()]
        scale = buffer[: part.numel()]
        scale.copy_(bits[start : start + part.numel()])
        part.mul_(scale)


_BIT_WEIGHTS = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.uint8)


def pack_mask(mask: Tensor) -> Tensor:
    """A bool mask as uint8 bytes, 8 entries per byte (most significant bit first), for checkpoints."""
    flat = mask.detach().reshape(-1).to("cpu", torch.bool)
    padded = torch.zeros(-(-flat.numel() // 8) * 8, dtype=torch.uint8)
    padded[: flat.numel()] = flat
    return (padded.view(-1, 8) * _BIT_WEIGHTS).sum(1, dtype=torch.uint8)


def unpack_mask(packed: Tensor, shape: tuple[int, ...] | list[int]) -> Tensor:
    """The bool mask of `shape` that `pack_mask` packed (exact, bit for bit)."""
    numel = 1
    for size in shape:
        numel *= int(size)
    if packed.dtype != torch.uint8 or packed.dim() != 1 or packed.numel() != -(-numel // 8):
        raise ValueError(
            f"a packed mask of shape {tuple(shape)} needs {-(-numel // 8)} uint8 bytes, got "
            f"{packed.numel()} {packed.dtype}"
        )
    bits = packed.reshape(-1, 1).bitwise_and(_BIT_WEIGHTS).ne(0).reshape(-1)
    return bits[:numel].reshape(tuple(int(s) for s in shape))
