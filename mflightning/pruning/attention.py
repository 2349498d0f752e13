"""Calibration statistics for torch-native attention (`nn.MultiheadAttention`).

`nn.MultiheadAttention` (inside `nn.TransformerEncoderLayer` / `DecoderLayer`, torchvision's ViT,
open_clip) never calls its projections as modules: `in_proj_weight` (or `q/k/v_proj_weight`) is a
bare parameter and `out_proj.weight` is handed to `F.multi_head_attention_forward`, which calls
`linear` on it itself, so forward pre-hooks see none of their inputs. During calibration each such
module's forward is replaced (an instance attribute, removed afterwards) by a wrapper that runs the
original forward under a `TorchFunctionMode` active only inside it. The mode catches the call to
`F.multi_head_attention_forward` and

* records the input projections' inputs from its arguments: a packed `in_proj_weight` gets every
  distinct tensor it multiplies, each once (self-attention: the query alone, exactly as a fused
  qkv `nn.Linear` called on x; cross-attention: query and key, and value when it is yet another
  tensor; the statistic is per input feature, so each input counts with its own tokens); separate
  `q/k/v_proj_weight` get query / key / value;
* runs a private copy of `F.multi_head_attention_forward` whose `linear` reports the input of the
  call that multiplies `out_proj.weight`: the concatenated head outputs, flattened by torch to
  (L * B, E) and reshaped back to (L, B, E) here. A mode alone cannot see that call, because
  `F.multi_head_attention_forward` hands itself to the mode as a whole (`handle_torch_function`)
  and runs its body with the mode switched off.

Inputs reach `F.multi_head_attention_forward` sequence-first, (L, B, E) when batched (a
`batch_first` module transposes them first) and (L, E) unbatched, so recorded inputs are always in
that layout; the statistics side transposes batched ones before applying the (B, L) token mask and
never filters unbatched ones. The fused fast paths (`torch._native_multi_head_attention`, the
encoder layer's `_transformer_encoder_layer_fwd`, taken in eval mode without gradients) would skip
all of this and the feed-forward modules too, so they are switched off while calibrating.
"""
from __future__ import annotations

import contextlib
import inspect
import types
from collections.abc import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

# The function MultiheadAttention.forward calls on its slow path (looked up once, as torch defines it).
_MHA_FUNCTION = F.multi_head_attention_forward
_MHA_SIGNATURE = inspect.signature(_MHA_FUNCTION)
# MHA attribute holding each role's weight; "in_proj" is the packed q/k/v weight.
_ROLES = (("in_proj", "in_proj_weight"), ("q", "q_proj_weight"), ("k", "k_proj_weight"), ("v", "v_proj_weight"))

RecordFn = Callable[[str, Sequence[Tensor]], None]


def attention_weights(module: nn.MultiheadAttention) -> list[nn.Parameter]:
    """The prunable weights of one MHA: its input projection(s), then its output projection."""
    weights = [getattr(module, attr) for _, attr in _ROLES]
    return [w for w in weights if isinstance(w, nn.Parameter)] + [module.out_proj.weight]


def seq_first_linears(model: nn.Module) -> set[int]:
    """ids of the nn.Linear modules known to read (L, B, E) inputs.

    Those are the feed-forward layers of torch's Transformer{Encoder,Decoder}Layer built with
    batch_first=False; their statistics transpose the input before applying the (B, L) token
    mask, and never take an (L, B) input for (B, L) when L == B.
    """
    ids: set[int] = set()
    for module in model.modules():
        if isinstance(module, (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)):
            if not module.self_attn.batch_first:
                ids.update((id(module.linear1), id(module.linear2)))
    return ids


@contextlib.contextmanager
def fastpath_disabled() -> Iterator[None]:
    """Switch torch's fused MHA / Transformer fast paths off (a process-wide flag), restored on exit."""
    backend = getattr(torch.backends, "mha", None)
    if backend is None or not hasattr(backend, "set_fastpath_enabled"):  # torch < 2.2: no switch
        yield
        return
    previous = backend.get_fastpath_enabled()
    backend.set_fastpath_enabled(False)
    try:
        yield
    finally:
        backend.set_fastpath_enabled(previous)


class AttentionObserver:
    """Feeds `record(target name, inputs)` with what each observed MHA's projection weights multiply.

    `add` each (module, target) pair, then use the observer as a context manager around the
    calibration forwards: entering replaces the modules' forward, leaving restores it (also when
    a forward raised). Recorded inputs are sequence-first (see the module docstring).
    """

    def __init__(self, record: RecordFn):
        self._record = record
        self._modules: dict[int, tuple[nn.MultiheadAttention, dict[str, str]]] = {}
        self._restore: list[Callable[[], None]] = []
        self._watch: tuple[Tensor, Callable[[Tensor], None]] | None = None
        self._function: Callable[..., tuple[Tensor, Tensor | None]] | None = None

    def add(self, module: nn.MultiheadAttention, name: str, param: Tensor) -> None:
        """Observe `param` (named `name`), one of `module`'s projection weights."""
        roles = self._modules.setdefault(id(module), (module, {}))[1]
        found = [role for role, attr in _ROLES if getattr(module, attr) is param]
        if module.out_proj.weight is param:
            found.append("out")
        if not found:
            raise ValueError(f"{name!r} is not a projection weight of the nn.MultiheadAttention it is listed with")
        for role in found:
            roles[role] = name

    def __bool__(self) -> bool:
        return bool(self._modules)

    def __enter__(self) -> "AttentionObserver":
        try:
            for module, roles in self._modules.values():
                self._install(module, roles)
        except BaseException:
            self._uninstall()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self._uninstall()
        self._watch = None

    # ---------------------------------------------------------------- wrapping
    def _install(self, module: nn.MultiheadAttention, roles: dict[str, str]) -> None:
        own = module.__dict__.get("forward")  # someone's instance-level forward, kept as is
        original = module.forward
        observer = self

        def forward(*args, **kwargs):
            probe = _Probe(observer, roles)
            with probe:
                out = original(*args, **kwargs)
            if not probe.calls:
                raise RuntimeError(
                    f"the nn.MultiheadAttention holding {sorted(set(roles.values()))} ran without calling "
                    "F.multi_head_attention_forward (a subclass with its own forward?), so what its projections "
                    "multiply cannot be observed; leave them dense with `exclude`"
                )
            return out

        module.forward = forward
        self._restore.append(lambda: _restore_forward(module, own))

    def _uninstall(self) -> None:
        while self._restore:
            self._restore.pop()()

    # ---------------------------------------------------------------- one call
    def attend(self, roles: dict[str, str], args: tuple, kwargs: dict) -> tuple[Tensor, Tensor | None]:
        """Run one F.multi_head_attention_forward call, recording the inputs of the observed weights."""
        bound = _MHA_SIGNATURE.bind(*args, **kwargs).arguments
        query, key, value = bound["query"], bound["key"], bound["value"]
        if bound.get("use_separate_proj_weight", False):
            for role, x in (("q", query), ("k", key), ("v", value)):
                if role in roles:
                    self._record(roles[role], [x])
        elif "in_proj" in roles:
            self._record(roles["in_proj"], _distinct((query, key, value)))
        name = roles.get("out")
        if name is None:
            return _MHA_FUNCTION(*args, **kwargs)
        shape = tuple(query.shape[:2]) if query.dim() == 3 else None  # (L, B) of the flattened rows
        seen: list[bool] = []

        def on_output_projection(x: Tensor) -> None:
            self._record(name, [x.reshape(*shape, x.shape[-1]) if shape is not None else x])
            seen.append(True)

        self._watch = (bound["out_proj_weight"], on_output_projection)
        try:
            out = self._observed_function()(*args, **kwargs)
        finally:
            self._watch = None
        if not seen:
            raise RuntimeError(
                f"could not observe the input of the output projection {name!r}: this torch "
                f"({torch.__version__}) did not multiply it through F.linear inside F.multi_head_attention_forward; "
                "leave it dense with `exclude`"
            )
        return out

    def _observed_function(self) -> Callable[..., tuple[Tensor, Tensor | None]]:
        """A private copy of F.multi_head_attention_forward whose global `linear` is `self._linear`."""
        if self._function is None:
            code, namespace = _MHA_FUNCTION.__code__, dict(_MHA_FUNCTION.__globals__)
            if "linear" not in code.co_names or not callable(namespace.get("linear")):
                raise RuntimeError(
                    f"this torch ({torch.__version__}) does not call `linear` inside F.multi_head_attention_forward, "
                    "so the input of nn.MultiheadAttention's out_proj cannot be observed; leave out_proj dense with `exclude`"
                )
            linear = namespace["linear"]

            def observed_linear(input: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
                watch = self._watch
                if watch is not None and weight is watch[0]:
                    watch[1](input)
                return linear(input, weight, bias)

            namespace["linear"] = observed_linear
            function = types.FunctionType(
                code, namespace, _MHA_FUNCTION.__name__, _MHA_FUNCTION.__defaults__, _MHA_FUNCTION.__closure__
            )
            function.__kwdefaults__ = _MHA_FUNCTION.__kwdefaults__
            self._function = function
        return self._function


class _Probe(TorchFunctionMode):
    """Active only inside one MHA forward: hands its F.multi_head_attention_forward call to the observer."""

    def __init__(self, observer: AttentionObserver, roles: dict[str, str]):
        super().__init__()
        self.observer = observer
        self.roles = roles
        self.calls = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is _MHA_FUNCTION:
            self.calls += 1
            return self.observer.attend(self.roles, args, kwargs)
        return func(*args, **kwargs)


def _restore_forward(module: nn.Module, own: Callable | None) -> None:
    if own is not None:
        module.forward = own
    else:
        module.__dict__.pop("forward", None)


def _distinct(tensors: Sequence[Tensor]) -> list[Tensor]:
    """The tensors, each object once (query is key is value in self-attention)."""
    out: list[Tensor] = []
    for t in tensors:
        if all(t is not o for o in out):
            out.append(t)
    return out
