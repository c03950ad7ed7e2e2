"""Mixed-adapter batches: one forward through the shared base, each row with its own adapter.

A `MixedModel` is a second module tree over the Deployer's base: every base tensor is shared with
the Deployer's model (no copy), and every Linear that any registered adapter changes is replaced
by a `MixedLinear`. Before a forward the Deployer groups a batch's rows by adapter (a stable sort
inside the batch, so each adapter's rows are one contiguous run) and hands the `RowPlan` the name
of every row. Each `MixedLinear` then runs

    y = x W0^T + b                                   for every row: the one shared GEMM
    y[rows of a]  = x[rows of a] H_a^T + c_a          each adapter's own task head, on its rows
    h = x [A_1; A_2; ...]^T                           the batch's LoRA factors, stacked: one GEMM
    h[t, block of a] = 0 unless token t is a's        each row keeps its own adapter's block only
    y += h [s_1 B_1, s_2 B_2, ...]^T                  one GEMM adds every row's own s_a B_a A_a x
    y[rows of a]  = adapter_a(y[rows of a])           each bottleneck adapter on its own rows

so every row gets exactly the low-rank update it gets when its adapter is served alone (the
masked blocks add exact zeros), in two batched products whatever the number of adapters, and the
stacked factors of a set of adapters are kept between batches. With one LoRA adapter in the batch
the product runs on its rows only. This is the batched form of the per-row gather that Punica
(SGMV) and S-LoRA build on and that PEFT's `adapter_names` does with index gathers; on a CPU the
fewer, larger products measured faster than one pair per adapter. Because the runs are contiguous,
"the rows of a" is a slice: of the batch rows for a (batch, tokens, hidden) input, and of the
packed token rows for the padding-free encoder's (tokens, hidden) input (packed rows are in
batch-row order). Rows with no adapter at a layer (the base, `"__base__"`, or a method that leaves
that layer alone) keep y = x W0^T + b, and the base's own head.

Limits: the base weights must be the plain W0, so a Deployer in merged mode cannot mix (it folds
one LoRA into W0); the Deployer refuses with an error that says what to do.
"""

from __future__ import annotations

import copy
import itertools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..core.surgery import WRAPPERS
from ..core.targets import replace_module
from ..layers.adapters import AdapterLinear
from ..layers.lora import LoRALinear
from ..layers.names import ADAPTER_PREFIX, LORA_PREFIX, under

BASE = "__base__"  # the row name for the base model with its own head and no adapter


class RowPlan:
    """Which adapter each row of the batch in flight uses, as contiguous runs of rows.

    `groups(x)` turns the runs into slices of x's rows, for any input a layer sees: a
    (batch, ...) input (rows are its first axis, each spanning the same number of positions) or
    a packed (tokens, hidden) input from the padding-free encoder (each row spans its length).
    """

    def __init__(self):
        self.runs: list[tuple[str, int, int]] = []  # (name, first row, end row)
        self.batch = 0
        self._starts: list[int] = []  # packed token offset of each row, and the total at the end
        self._cache: dict = {}

    def set(self, names: list[str], lengths: list[int]) -> None:
        """Plan one batch: `names[i]` and `lengths[i]` (real tokens) of row i; equal names adjacent."""
        runs, start = [], 0
        for i in range(1, len(names) + 1):
            if i == len(names) or names[i] != names[start]:
                runs.append((names[start], start, i))
                start = i
        if len({n for n, _, _ in runs}) != len(runs):
            raise ValueError("RowPlan.set needs the rows of each adapter next to each other; sort them first.")
        self.runs, self.batch = runs, len(names)
        self._starts = [0] + list(itertools.accumulate(lengths))
        self._cache = {}

    def clear(self) -> None:
        self.runs, self.batch, self._starts, self._cache = [], 0, [], {}

    def drop_mask(self, shape: torch.Size, blocks: tuple, device) -> torch.Tensor:
        """(tokens, sum of ranks) bool: True where a token's row does not use that column's adapter.
        `blocks` is ((name, rank), ...), the stacked factors' layout."""
        key = (tuple(shape[:-1]), blocks)
        if key not in self._cache:
            n = 1
            for d in shape[:-1]:
                n *= d
            token = torch.full((n,), -1, dtype=torch.long)
            index = {name: i for i, (name, _) in enumerate(blocks)}
            for name, rows in self.groups(shape):
                if name in index:
                    token[rows] = index[name]
            column = torch.repeat_interleave(torch.arange(len(blocks)), torch.tensor([r for _, r in blocks]))
            self._cache[key] = (token[:, None] != column[None, :]).to(device)
        return self._cache[key]

    def groups(self, shape: torch.Size) -> list[tuple[str, slice]]:
        """(name, slice of the flattened leading axes) for each run, for an input of `shape`."""
        lead = tuple(shape[:-1])
        if lead not in self._cache:
            n = 1
            for d in lead:
                n *= d
            if len(lead) >= 2 and lead[0] == self.batch:
                per = n // self.batch  # positions per row
                out = [(name, slice(a * per, b * per)) for name, a, b in self.runs]
            elif len(lead) == 1 and n == self.batch:
                out = [(name, slice(a, b)) for name, a, b in self.runs]
            elif len(lead) == 1 and n == self._starts[-1]:
                out = [(name, slice(self._starts[a], self._starts[b])) for name, a, b in self.runs]
            else:
                raise RuntimeError(f"a mixed batch of {self.batch} rows ({self._starts[-1]} real tokens) reached a "
                                   f"layer with input shape {tuple(shape)}, which matches neither; this model's "
                                   "forward is not one MixedModel knows.")
            self._cache[lead] = out
        return self._cache[lead]


@dataclass
class Parts:
    """What one adapter does at one Linear: a LoRA update, a bottleneck adapter after it, or (for the
    task head) its own weight and bias in place of the base's."""

    lora: tuple[torch.Tensor, torch.Tensor, float] | None = None  # A (r, in), B (out, r), scale
    adapter: nn.Module | None = None
    head: tuple[torch.Tensor, torch.Tensor | None] | None = None


class MixedLinear(nn.Module):
    """A base Linear run once for the whole batch, then each adapter's parts on that adapter's rows."""

    def __init__(self, base: nn.Linear, plan: RowPlan):
        super().__init__()
        self.base = base
        self.plan = plan
        self.parts: dict[str, Parts] = {}
        self._stacks: dict = {}  # names -> (A stacked, (s B stacked)^T, ((name, rank), ...))

    in_features = property(lambda self: self.base.in_features)
    out_features = property(lambda self: self.base.out_features)

    def set_parts(self, name: str, parts: Parts | None) -> None:
        """Hold `parts` for adapter `name` (None: drop it); stacked factors are rebuilt when next needed."""
        if parts is None:
            self.parts.pop(name, None)
        else:
            self.parts[name] = parts
        self._stacks.clear()

    def _stack(self, names: tuple):
        if names not in self._stacks:
            loras = [self.parts[n].lora for n in names]
            a = torch.cat([a for a, _, _ in loras])  # (sum r, in)
            bt = torch.cat([b * s for _, b, s in loras], dim=1).t()  # (sum r, out)
            if len(self._stacks) > 16:
                self._stacks.clear()
            self._stacks[names] = (a, bt, tuple((n, lo[0].shape[0]) for n, lo in zip(names, loras)))
        return self._stacks[names]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if not self.parts:
            return y
        groups = [(name, rows, self.parts[name]) for name, rows in self.plan.groups(x.shape) if name in self.parts]
        if not groups:
            return y
        xf, yf = x.reshape(-1, x.shape[-1]), y.view(-1, y.shape[-1])
        for name, rows, p in groups:
            if p.head is not None:
                yf[rows].copy_(F.linear(xf[rows], *p.head))  # slices: views, no copies
        loras = [(name, rows, p.lora) for name, rows, p in groups if p.lora is not None]
        if len(loras) == 1:
            _, rows, (a, b, s) = loras[0]
            yf[rows].add_(F.linear(F.linear(xf[rows], a), b), alpha=s)
        elif loras:
            a, bt, blocks = self._stack(tuple(name for name, _, _ in loras))
            h = F.linear(xf, a).masked_fill_(self.plan.drop_mask(x.shape, blocks, x.device), 0.0)
            yf.addmm_(h, bt)
        for name, rows, p in groups:
            if p.adapter is not None:
                yf[rows].copy_(p.adapter(yf[rows]))
        return y

    def extra_repr(self) -> str:
        return f"adapters={sorted(self.parts)}"


def shared_copy(model: nn.Module) -> nn.Module:
    """A copy of `model`'s module tree whose every parameter and buffer is the original's tensor."""
    memo = {id(t): t for t in itertools.chain(model.parameters(), model.buffers())}
    return copy.deepcopy(model, memo)


def _unwrap(module: nn.Module):
    """(the LoRALinear, the AdapterLinear) found at one site of a model with a method applied."""
    lora = adapter = None
    while isinstance(module, WRAPPERS):
        if isinstance(module, AdapterLinear) and adapter is None:
            adapter = module
        elif isinstance(module, LoRALinear) and lora is None:
            lora = module
        module = module.base
    return lora, adapter


def entry_parts(entry, applied_skeleton: nn.Module, head: str | None, device) -> dict[str, Parts]:
    """Site name -> Parts for one registered adapter (`entry`, a registry.Registered), read from its
    tensors and from `applied_skeleton`, the meta-device base with its method applied (for each
    LoRA's scale and each adapter's module shape). Tensors move to `device` (no copy on CPU)."""
    tensors = {k: t.to(device) for k, t in zip(entry.keys, entry.tensors)}
    sites: dict[str, Parts] = {}
    lora_mark, adapter_mark = "." + LORA_PREFIX, "." + ADAPTER_PREFIX + "branch."
    for key in entry.keys:
        if entry.head is not None and under(key, entry.head):
            site = entry.head
        elif lora_mark in key:
            site = key[:key.rindex(lora_mark)]
        elif adapter_mark in key:
            site = key[:key.index(adapter_mark)]
        else:
            raise ValueError(f"adapter {entry.name!r}: tensor {key} is neither a LoRA factor, an adapter "
                             "tensor nor the head's, so it cannot be served in a mixed batch.")
        sites.setdefault(site, Parts())
    for site, parts in sites.items():
        if site == entry.head:
            w = tensors[f"{site}.weight"]
            parts.head = (w, tensors.get(f"{site}.bias"))
            continue
        lora, adapter = _unwrap(applied_skeleton.get_submodule(site))  # the outermost wrapper sits at the site
        if lora is not None:
            parts.lora = (tensors[f"{site}.lora_A"], tensors[f"{site}.lora_B"], float(lora.scale))
        if adapter is not None:
            prefix = f"{site}.{ADAPTER_PREFIX}branch."
            branch = copy.deepcopy(getattr(adapter, ADAPTER_PREFIX + "branch")).to_empty(device=device)
            branch.load_state_dict({k[len(prefix):]: t for k, t in tensors.items() if k.startswith(prefix)})
            parts.adapter = branch.eval().requires_grad_(False)
    return sites


class MixedModel:
    """The Deployer's base with per-row adapters (see the module docstring).

    Args:
        plain: the base model before any method was applied; its tensors are shared, not copied.
        head: the task head's module name (None: the model has none); its weights, `head0`, are
            copied, since the Deployer's live head is overwritten on every switch.
    """

    def __init__(self, plain: nn.Module, head: str | None, head0: dict, device):
        self.model = shared_copy(plain).eval()
        self.plan = RowPlan()
        self.device = device
        self.sites: dict[str, MixedLinear] = {}
        self.held: dict[str, object] = {}  # name -> the Registered entry its parts came from
        if head is not None:
            base = self.model.get_submodule(head)
            own = copy.deepcopy(base, {id(t): t.detach().clone() for t in base.parameters()})
            with torch.no_grad():
                for k, p in own.named_parameters():
                    p.copy_(head0[f"{head}.{k}"])
            self._site(head, own)

    def _site(self, name: str, base: nn.Module | None = None) -> MixedLinear:
        if name not in self.sites:
            base = base if base is not None else self.model.get_submodule(name)
            if not isinstance(base, nn.Linear):
                raise TypeError(f"a mixed batch adapts Linear layers only; {name} is a {type(base).__name__}.")
            self.sites[name] = MixedLinear(base, self.plan)
            replace_module(self.model, name, self.sites[name])
        return self.sites[name]

    def sync(self, entries: dict, skeleton_for) -> None:
        """Hold exactly the registered adapters `entries` (name -> Registered): drop the ones gone or
        replaced, add the new ones. `skeleton_for(entry)` gives the meta base with its method applied."""
        for name in [n for n, e in self.held.items() if entries.get(n) is not e]:
            for site in self.sites.values():
                site.set_parts(name, None)
            del self.held[name]
        for name, e in entries.items():
            if name in self.held:
                continue
            for site, parts in entry_parts(e, skeleton_for(e), e.head, self.device).items():
                self._site(site).set_parts(name, parts)
            self.held[name] = e

    def logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, names: list[str]) -> torch.Tensor:
        """One forward for the batch; row i with adapter names[i] (rows of each adapter adjacent)."""
        self.plan.set(names, attention_mask.sum(1).tolist())
        try:
            return self.model(input_ids=input_ids, attention_mask=attention_mask).logits
        finally:
            self.plan.clear()
