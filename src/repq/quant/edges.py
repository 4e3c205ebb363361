"""The network's edge layers: those that read the input and those whose outputs are the network's outputs.

Low-bit training keeps them wider (QATConfig.edge_bits), as LSQ and most 4-bit work do: the first layer sees raw
pixels, the last ones write the logits or boxes directly. "Last" is a property of the graph, not of the module
order: a detector has six output convs (class and box maps at three levels), so they are found from the autograd
graph of one forward pass, walking back from every output until the first parametric layer on each path.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from repq.reparam.verify import tensors_of


def edge_layers(model: nn.Module, example: Tensor, layer_types: tuple[type, ...] = (nn.Conv2d, nn.Linear)
                ) -> tuple[list[str], list[str]]:
    """(input layers, output layers) of `model` among its `layer_types` modules, in execution order.

    Input layer: the first one to run (the layer that reads the network input). Output layers: those whose output
    reaches a network output through parameter-free operations only (concat, reshape, activation, pooling...)."""
    layers = {m: n for n, m in model.named_modules() if isinstance(m, layer_types)}
    order: list[str] = []
    made_by: dict[object, str] = {}   # autograd node of a layer's output -> layer name

    def hook(module, args, output):
        order.append(layers[module])
        for t in tensors_of(output):
            if t.grad_fn is not None:
                made_by.setdefault(t.grad_fn, layers[module])

    handles = [m.register_forward_hook(hook) for m in layers]
    was_training = model.training
    try:
        with torch.enable_grad():
            model.eval()
            x = example.detach().clone().requires_grad_(True) + 0   # not a leaf: in-place ops stay legal
            outputs = tensors_of(model(x))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    found: list[str] = []
    seen: set[object] = set()
    stack = [t.grad_fn for t in outputs if t.grad_fn is not None]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if node in made_by:                 # a layer's output: stop here, earlier layers are not edges
            found.append(made_by[node])
            continue
        stack.extend(next_node for next_node, _ in node.next_functions)
    position = {name: i for i, name in reversed(list(enumerate(order)))}
    outputs_sorted = sorted(set(found), key=lambda n: position.get(n, len(order)))
    return order[:1], outputs_sorted


def widens_edges(edge_bits: int | None, w_bits: int, a_bits: int) -> bool:
    """Whether `edge_bits` makes the edge layers wider than the rest: it is a floor, so it never narrows them (at
    W8A8 an edge_bits of 8 changes nothing, and nothing needs tracing)."""
    return edge_bits is not None and edge_bits > min(w_bits, a_bits)


def layer_widths(names: list[str], w_bits: int, a_bits: int, edge_bits: int | None, edges: set[str],
                 max_w_bits: int | None = None) -> dict[str, tuple[int, int]]:
    """(weight bits, activation bits) per layer: at least `edge_bits` for both on the `edges` layers when it is
    set, `w_bits` / `a_bits` elsewhere (PTQConfig.edge_bits and QATConfig.edge_bits); weights at most
    `max_w_bits` everywhere when it is set (reduce_range)."""
    if not widens_edges(edge_bits, w_bits, a_bits):
        widths = {n: (w_bits, a_bits) for n in names}
    else:
        widths = {n: (max(edge_bits, w_bits), max(edge_bits, a_bits)) if n in edges else (w_bits, a_bits)
                  for n in names}
    if max_w_bits is not None:
        widths = {n: (min(w, max_w_bits), a) for n, (w, a) in widths.items()}
    return widths
