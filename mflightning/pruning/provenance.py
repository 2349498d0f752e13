"""Which layer inputs carry text tokens, traced from the batch rather than guessed from shapes.

The token mask (`attention_mask`, (B, L)) may only filter an input whose tokens are the text's.
A vision layer with as many tokens as the text is long has the same leading dims, so shapes
cannot tell them apart. When no preset or `image_groups=` declares which groups read image
tokens, the first calibration forward (the probe; its statistics count as usual) traces where each
prunable layer's input comes from. Its sources are marked by identity autograd functions:

* text: an `nn.Embedding` looking up one of the batch's integer tensors of the token mask's shape
  (its `input_ids`); without such a lookup, the batch's one floating tensor whose leading dims
  are the mask's, (B, L) or (L, B) (e.g. `inputs_embeds`), if there is exactly one;
* ambiguous: a floating batch tensor with the mask's leading dims that is not the text (two such
  tensors, or one beside token ids): patches or word vectors, nothing says;
* other: every other floating batch tensor (`pixel_values`, patches of another length).

The probe runs with gradients on and the parameters frozen (so only activations that depend on the
batch join the graph; a sharded DTensor parameter is left as it is, the graph walk decides either
way). An input whose graph reaches a text mark carries text tokens (fused text tokens and a
language model's image positions included: their mask is 1); one that reaches only other marks
(patch tokens, queries cross-attending to them) is never filtered. Anything else is unknown
(ambiguous or no source, gradients switched off inside the forward, a forward that cannot run with
gradients, which is then rerun as usual): such a layer whose input matches the mask's dims is an
error asking for `image_groups`. A mask-shaped float input's role waits for the end of the probe
(is it the text, or were token ids looked up too?): both its filtered and unfiltered sums are kept
until then.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, Callable

import torch
from torch import Tensor, nn

from .batches import clone_inference_tensors, map_tensors


class _Mark(torch.autograd.Function):
    """Identity whose backward node marks a source in the autograd graph (subclassed per kind)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor) -> Tensor:
        return x.clone()  # a copy, so the model may change it in place

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:  # pragma: no cover - the probe never runs backward
        return grad


class _IdsMark(_Mark):  # an embedding of the batch's token ids
    pass


class _AlignedMark(_Mark):  # a floating batch tensor with the token mask's leading dims
    pass


class _OtherMark(_Mark):
    pass


_KINDS = {"_IdsMarkBackward": "ids", "_AlignedMarkBackward": "aligned", "_OtherMarkBackward": "other"}


def _marked(mark: type[_Mark], x: Tensor) -> Tensor:
    if not x.requires_grad:  # an inference tensor cannot take requires_grad: a normal copy of it does
        x = (x.clone() if x.is_inference() else x.detach()).requires_grad_()
    return mark.apply(x)


DEFER = "defer"  # a role known only when the probe forward ends (a mask-shaped float: is it the text?)


class TokenRoles:
    """Per layer, per call and per input: does the input carry text tokens? Traced during the first forward.

    `names` are the layers whose role must be inferred (no declaration covers them); the others are
    not asked about. A role is True (text tokens), False (other tokens) or None (unknown).
    """

    def __init__(self, names: Iterable[str]):
        self.names = frozenset(names)
        self.pending = bool(self.names)  # the probe has yet to run
        self.probing = False
        self.aligned_is_text = False  # set when the probe ends
        self.reason = "its calls in this batch differ from those traced on the first batch"
        # per layer, per call, per input: True text tokens, False other tokens, None unknown
        self._roles: dict[str, list[list[Any]]] = {}
        self._calls: dict[str, int] = {}  # calls per layer in the current forward
        self._memo: dict[Any, frozenset[str]] = {}  # autograd node -> kinds of marks below it
        self._why: dict[str, str] = {}
        self._untraced = ""

    # ---------------------------------------------------------------- the probe forward
    def observe(self, name: str, inputs: Sequence[Tensor]) -> list[Any]:
        """During the probe: the role of each input of this call of `name` (True, False, None or DEFER)."""
        if not torch.is_grad_enabled():
            self._why[name] = "gradients were switched off inside the forward where it runs (torch.no_grad?), so it could not be traced"
            call: list[Any] = [None] * len(inputs)
        else:
            call = [self._role(name, x) for x in inputs]
        self._roles.setdefault(name, []).append(call)
        return call

    def _role(self, name: str, x: Tensor) -> Any:
        kinds = self._sources_of(x.grad_fn) if x.requires_grad and x.grad_fn is not None else frozenset()
        if "ids" in kinds:
            return True
        if kinds == {"other"}:
            return False
        if "aligned" in kinds:
            return DEFER
        self._why[name] = f"it depends on no batch tensor the probe could trace ({self._untraced})"
        return None

    def _sources_of(self, root: Any) -> frozenset[str]:
        """The kinds of marks in the graph below `root` (iterative, each node visited once per probe)."""
        memo = self._memo
        stack = [(root, False)]
        while stack:
            node, expanded = stack.pop()
            if node in memo and not expanded:
                continue
            kind = _KINDS.get(type(node).__name__)
            if kind is not None:
                memo[node] = frozenset((kind,))
                continue
            children = [n for n, _ in node.next_functions if n is not None]
            if expanded:
                memo[node] = frozenset().union(*(memo.get(c, frozenset()) for c in children))
                continue
            stack.append((node, True))
            stack.extend((c, False) for c in children if c not in memo)
        return memo[root]

    @contextlib.contextmanager
    def probe(self, model: nn.Module, batch: Any, mask: Tensor, frozen: Callable[[Tensor], bool]) -> Iterator[Any]:
        """The block runs the forward on the batch it is given: a copy whose floating tensors are marked.

        `frozen(p)` says whether parameter p may have its `requires_grad` switched off meanwhile
        (restored after). After the block, `aligned_is_text` says how DEFER roles resolve.
        """
        batch = clone_inference_tensors(batch)  # autograd cannot save inference tensors (e.g. a mask it multiplies)
        tensors = _tensors(batch)
        ids = [t for t in tensors if not t.is_floating_point() and not t.is_complex() and t.shape == mask.shape]
        # (B, L), or (L, B) for sequence-first inputs, or B*L rows (tokens flattened batch-major)
        token_dims = {tuple(mask.shape), tuple(mask.shape)[::-1]}
        aligned = [
            t for t in tensors
            if t.is_floating_point() and t.dim() >= 2 and (tuple(t.shape[:2]) in token_dims or t.shape[0] == mask.numel())
        ]
        lookups = [0]
        marked: dict[int, Tensor] = {}  # a tensor given twice (key and value) stays one tensor

        def mark_float(t: Tensor) -> Tensor:
            if not t.is_floating_point():
                return t
            if id(t) not in marked:
                marked[id(t)] = _marked(_AlignedMark if any(t is a for a in aligned) else _OtherMark, t)
            return marked[id(t)]

        def mark_ids(module: nn.Module, args: tuple, out: Any) -> Any:
            x = args[0] if args else None
            if isinstance(x, Tensor) and isinstance(out, Tensor) and any(_same_data(x, t) for t in ids):
                lookups[0] += 1
                return _marked(_IdsMark, out)
            return None

        self._untraced = (
            f"no nn.Embedding looked up the batch's token ids, an integer tensor of the token mask's shape {tuple(mask.shape)}"
        )
        handles = [m.register_forward_hook(mark_ids) for m in model.modules() if isinstance(m, nn.Embedding)]
        params = [p for p in model.parameters() if p.requires_grad and frozen(p)]
        self.probing = True
        try:
            for p in params:
                p.requires_grad_(False)
            with torch.enable_grad():
                yield map_tensors(batch, mark_float)
        finally:
            self.probing = False
            self.pending = False
            for p in params:
                p.requires_grad_(True)
            for h in handles:
                h.remove()
            self._memo = {}
        self.aligned_is_text = not lookups[0] and len(aligned) == 1
        ambiguous = (
            f"it comes from a floating batch tensor with the token mask's leading dims, and {len(aligned)} such tensors "
            f"{'beside token ids ' if lookups[0] else ''}may be word vectors or image patches"
        )
        for name, calls in self._roles.items():
            for call in calls:
                for i, role in enumerate(call):
                    if role is DEFER:
                        call[i] = True if self.aligned_is_text else None
                        if not self.aligned_is_text:
                            self._why.setdefault(name, ambiguous)

    def failed(self, error: BaseException) -> None:
        """The probe forward raised: every role is unknown."""
        self._roles, self._why = {}, {}
        self.reason = f"the forward could not be traced with gradients on ({type(error).__name__}: {str(error)[:200]})"

    def reason_for(self, name: str) -> str:
        """Why `name`'s role is unknown, for the error message."""
        return self._why.get(name, self.reason)

    # ---------------------------------------------------------------- the forwards after it
    def start_batch(self) -> None:
        self._calls = {}

    def roles_of_call(self, name: str, count: int) -> list[bool | None]:
        """The roles of the inputs of `name`'s next call in this forward (None: unknown)."""
        call = self._calls.get(name, 0)
        self._calls[name] = call + 1
        recorded = self._roles.get(name)
        if not recorded:
            return [None] * count
        if call < len(recorded) and len(recorded[call]) == count:
            return recorded[call]
        every = {role for roles in recorded for role in roles}
        return [every.pop() if len(every) == 1 else None] * count


def unknown_role_error(name: str, shape: Sequence[int], mask_shape: Sequence[int], reason: str) -> ValueError:
    """The error for a layer whose input may or may not be text tokens: only a declaration can say."""
    return ValueError(
        f"prunable layer {name!r}: its input {tuple(shape)} starts with the token mask's dims {tuple(mask_shape)}, "
        f"but whether it carries text tokens (to leave padding out) or image tokens cannot be known: {reason}. "
        "Declare the groups that read image tokens with image_groups=[...] (image_groups=() if none does), "
        "or use a preset that declares them"
    )


def _same_data(x: Tensor, t: Tensor) -> bool:
    return x.shape == t.shape and x.device == t.device and x.data_ptr() == t.data_ptr()


def _tensors(batch: Any) -> list[Tensor]:
    found: list[Tensor] = []
    map_tensors(batch, lambda t: found.append(t) or t)
    return found
