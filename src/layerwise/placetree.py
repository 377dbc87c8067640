"""A model's module tree as placement sees it, and transformers' placement worked out on it alone.

`PlaceTree` holds what `from_pretrained(device_map="auto")` looks at when it places a model: every
module, parameter and buffer by name, in the order torch walks them, with its bytes as
transformers counts them (`compute_module_sizes`: tied copies not counted), the class names
that may not be split, and the tied groups. It is plain data (JSON), built once from a meta
model (placement.tree_of) and kept by plancache.py, so a later `layerwise plan` needs neither
torch nor transformers.

`device_map` gives the map transformers' `_get_device_map` gives for a strategy word ("auto",
"balanced", "balanced_low_0", "sequential") and per-device budgets, from the tree alone:
balanced budgets (`get_balanced_memory`), then devices filled in order, each keeping room for
the largest unsplittable layer still to come on the first GPU and the CPU, a module that does
not fit split into its parameters and children unless its class may not be split, tied
parameters kept with the module that holds their first copy, and finally the submodules of a
module that all landed on one device merged into it. The equality with transformers' own
routine is a test (tests/test_placetree.py: every built-in architecture, every strategy, GPU
counts and budgets drawn at random), and the first plan of each model checks it once more
(placement.plan_for). A model with `_no_placement_params` is not handled here (NotHandled).
Standard library only: `layerwise plan` runs it before torch is imported.
"""

from __future__ import annotations

from dataclasses import dataclass

FORMAT = 1
_MODULE, _PARAM = "m", "p"


class NotHandled(Exception):
    """What the tree alone cannot place as transformers would (the caller builds the model)."""


@dataclass(frozen=True)
class Node:
    name: str  # full path; "" is the model
    kind: str  # "m" module, "p" parameter, "r" a parameter the model holds under another name first, "b" buffer
    cls: str  # a module's class name ("" for a tensor)
    size: int  # bytes as transformers counts them (0 for a tied or repeated tensor)
    params: tuple[int, ...] = ()  # a module's own parameters, then
    children: tuple[int, ...] = ()  # its child modules, then
    buffers: tuple[int, ...] = ()  # its own buffers (indices into PlaceTree.nodes)

    @property
    def is_module(self) -> bool:
        return self.kind == _MODULE


@dataclass(frozen=True)
class PlaceTree:
    nodes: tuple[Node, ...]  # nodes[0] is the model, the rest in the order torch walks them
    no_split: tuple[str, ...]  # class names never split over devices (`_no_split_modules`)
    tied: tuple[tuple[str, str], ...]  # (tied parameter, the parameter it is tied to)
    no_placement: tuple[str, ...] | None = None  # `_no_placement_params` (not handled here)

    @property
    def total(self) -> int:
        return self.nodes[0].size

    def order(self) -> dict[str, int]:
        """Every name's position in model order."""
        return {n.name: i for i, n in enumerate(self.nodes)}

    def param_names(self) -> list[str]:
        """The model's parameters as `named_parameters()` names them (each once)."""
        return [n.name for n in self.nodes if n.kind == _PARAM]

    def sizes(self) -> dict[str, int]:
        """Bytes per module and per tensor name (transformers' `compute_module_sizes`)."""
        return {n.name: n.size for n in self.nodes}

    def to_json(self) -> dict:
        return {"format": FORMAT, "no_split": list(self.no_split), "tied": [list(t) for t in self.tied],
                "no_placement": None if self.no_placement is None else list(self.no_placement),
                "nodes": [[n.name, n.kind, n.cls, n.size, list(n.params), list(n.children), list(n.buffers)]
                          for n in self.nodes]}

    @classmethod
    def from_json(cls, data: dict) -> "PlaceTree":
        if data.get("format") != FORMAT:
            raise ValueError(f"a placement tree of format {data.get('format')!r}, not {FORMAT}")
        nodes = tuple(Node(str(name), str(kind), str(c), int(size), tuple(p), tuple(ch), tuple(b))
                      for name, kind, c, size, p, ch, b in data["nodes"])
        no_placement = data.get("no_placement")
        return cls(nodes, tuple(data["no_split"]), tuple((str(a), str(b)) for a, b in data["tied"]),
                   None if no_placement is None else tuple(no_placement))


def _tied_groups(tree: PlaceTree) -> list[list[str]]:
    """transformers' groups: each target with the parameters tied to it, sorted."""
    targets = {target for _, target in tree.tied}
    return [sorted([k for k, t in tree.tied if t == target] + [target]) for target in targets] or [[]]


def _ordered(max_memory: dict) -> dict:
    """The budgets in the order devices are filled: GPUs by index, then mps, cpu, disk."""
    gpus = sorted(k for k in max_memory if isinstance(k, int))
    return {k: max_memory[k] for k in gpus + [k for k in ("mps", "cpu", "disk") if k in max_memory]}


def balanced_budgets(tree: PlaceTree, max_memory: dict, low_zero: bool = False) -> dict:
    """`get_balanced_memory`: every GPU but the last capped near an even share of the weights."""
    budgets = _ordered(max_memory)
    accelerators = {k: v for k, v in budgets.items() if k not in ("cpu", "disk")}
    count = sum(1 for v in accelerators.values() if v > 0)
    if count == 0:
        return budgets
    if count == 1:
        low_zero = False
    share = tree.total // (count - 1 if low_zero else count)
    nodes = tree.nodes
    unsplit = [n.size for n in nodes if n.is_module and n.cls in tree.no_split]
    if tree.no_split and not unsplit:
        raise NotHandled("no module of the classes that may not be split")
    leaves = [sum(nodes[i].size for i in n.params + n.buffers) for n in nodes[1:]
              if n.is_module and (n.params or n.buffers)]
    share += int(1.25 * max(max(unsplit, default=0), max(leaves, default=0)))
    gpus = sorted(k for k, v in budgets.items() if isinstance(k, int) and v > 0)
    for index in gpus[:-1]:
        budgets[index] = min(budgets[0] if low_zero and index == 0 else share, budgets[index])
    if low_zero:
        budgets[0] = min(max(0, tree.total - sum(budgets[i] for i in range(1, count))), budgets[0])
    return budgets


def _largest_layer(tree: PlaceTree, entries: list[tuple[str, int]]) -> tuple[int, list[str]]:
    """`get_max_layer_size`: the largest module that is not split further (no children, or a
    class that may not be split), with the names reaching it."""
    nodes, best, names = tree.nodes, 0, []
    todo = list(entries)
    while todo:
        name, index = todo.pop(0)
        node = nodes[index]
        if node.is_module and node.children and node.cls not in tree.no_split:
            todo = [(nodes[c].name, c) for c in node.children] + todo
            continue
        if node.size > best:
            best, names = node.size, [name]
        elif node.size == best:
            names.append(name)
    return best, names


def _modules(tree: PlaceTree, queue: list[tuple[str, int]]) -> list[tuple[str, int]]:
    return [(name, i) for name, i in queue if tree.nodes[i].is_module]


def device_map(tree: PlaceTree, strategy: str, max_memory: dict) -> dict:
    """The device map transformers' `_get_device_map(model, strategy, max_memory)` gives, from
    the tree alone, in model order. `max_memory`: {GPU index: bytes, "cpu": bytes}."""
    if tree.no_placement is not None:
        raise NotHandled("the model has parameters kept off the devices (_no_placement_params)")
    budgets = balanced_budgets(tree, max_memory, strategy == "balanced_low_0") if strategy != "sequential" \
        else _ordered(max_memory)
    placed = _clean(_fill(tree, _ordered(budgets)))
    order = tree.order()
    return dict(sorted(placed.items(), key=lambda item: order.get(item[0], len(order))))


def _fill(tree: PlaceTree, budgets: dict) -> dict:
    """`infer_auto_device_map`: the modules in order onto the devices in order (see the module's
    docstring)."""
    nodes, no_split = tree.nodes, tree.no_split
    devices = list(budgets) + ([] if "disk" in budgets else ["disk"])
    gpus = [d for d in devices if d not in ("cpu", "disk")]
    main = ["mps"] if "mps" in gpus else [gpus[0], "cpu"] if gpus else ["cpu"]
    groups = _tied_groups(tree)
    root = nodes[0]
    queue = [(nodes[i].name, i) for i in root.params + root.children + root.buffers]
    placed: dict = {}
    current = 0
    used = dict.fromkeys(devices, 0)
    largest, largest_names = _largest_layer(tree, queue)
    while queue:
        name, index = queue.pop(0)
        node = nodes[index]
        largest_names = [n for n in largest_names if n != name and not n.startswith(name + ".")]
        if not largest_names:
            largest, largest_names = _largest_layer(tree, _modules(tree, queue))
        dotted = name + "."
        relevant = [g for g in groups if any(dotted in k + "." for k in g) and not all(dotted in k + "." for k in g)]
        outside = [p for g in relevant for p in g if dotted not in p + "."]
        device = devices[current]
        room = budgets[device] if device != "disk" else None
        reserved = 0
        if device in main:
            room, reserved = room - largest, largest
        size, tied_names, tied_nodes = _with_ties(tree, outside, node.size, queue)
        if room is None or used[device] + size <= room:
            used[device] += size
            placed[name] = device
            for tied_name in tied_names:
                at = next((i for i, (n, _) in enumerate(queue) if n == tied_name), None)
                if at is not None:
                    queue.pop(at)
                placed[tied_name] = device
            continue
        if outside and used[device] + node.size <= room:
            split = _split_tied(tree, name, index, tied_names, tied_nodes, queue)
            if split is not None:
                queue = split
                largest, largest_names = _largest_layer(tree, _modules(tree, queue))
                continue
        if node.is_module and node.children and node.cls not in no_split:
            queue = [(nodes[i].name, i) for i in node.params + node.children] + queue
            largest, largest_names = _largest_layer(tree, _modules(tree, queue))
            continue
        used[device] += reserved  # neither it nor a tied module can be split: the next device
        current += 1
        if current >= len(devices):
            raise NotHandled("no device left")
        queue = [(name, index)] + queue
    _check_ties(groups, placed)
    return placed


def _with_ties(tree: PlaceTree, outside: list[str], size: int, queue: list) -> tuple[int, list[str], list[int]]:
    """`get_module_size_with_ties`: the module's bytes plus those of the modules still queued
    that hold its tied parameters."""
    names, indices = [], []
    for param in outside:
        holder = next(((n, i) for n, i in queue if param.startswith(n + ".")), None)
        if holder is None:
            raise NotHandled(f"the tied parameter {param} is in no module still to place")
        if holder[0] not in names:
            names.append(holder[0])
            indices.append(holder[1])
            size += tree.nodes[holder[1]].size
    return size, names, indices


def _split_tied(tree: PlaceTree, name: str, index: int, tied_names: list[str], tied_nodes: list[int],
                queue: list) -> list | None:
    """The queue with the first splittable module holding a tied parameter replaced by its
    parameters and children (and `name` first again); None when none can be split."""
    nodes = tree.nodes
    for tied_name, tied_index in zip(tied_names, tied_nodes):
        holder = nodes[tied_index]
        if not holder.is_module:
            raise NotHandled(f"the tied parameter {tied_name} is not in a module")
        if not holder.children or holder.cls in tree.no_split:
            continue
        at = next(i for i, (n, _) in enumerate(queue) if n == tied_name)
        parts = [(nodes[i].name, i) for i in holder.params + holder.children]
        return [(name, index)] + queue[:at] + parts + queue[at + 1:]
    return None


def _check_ties(groups: list[list[str]], placed: dict) -> None:
    """Every tied parameter must have a device (transformers raises where one has none)."""
    for group in groups:
        for param in group:
            key = param
            while key not in placed:
                if key == "":
                    raise NotHandled(f"the device map does not place {param}")
                key = key.rpartition(".")[0]


def _clean(placed: dict, module: str = "") -> dict:
    """`clean_device_map`: a module whose placed submodules all share one device is placed whole."""
    prefix = module + "." if module else ""
    inside = [k for k in placed if k.startswith(prefix)]
    values = {placed[k] for k in inside}
    if len(values) == 1 and len(inside) > 1:
        value = placed[inside[0]]
        for k in inside:
            del placed[k]
        placed[module] = value
    depth = len(module.split(".")) + 1 if module else 1
    children = sorted({".".join(k.split(".")[:depth]) for k in placed if k.startswith(prefix) and len(k) > len(module)})
    for child in children:
        _clean(placed, child)
    return placed
