"""``module_weights_id``: a content id of a module's weights, checked against the formula it documents."""

from __future__ import annotations

import hashlib

import torch

from cachepolicy.models import module_weights_id


def _module(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    module = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4))
    module.register_buffer("steps", torch.tensor([1, 2, 3]))
    return module


def test_id_is_sha256_of_names_dtypes_shapes_and_bytes():
    module = _module()
    digest = hashlib.sha256()
    for name, tensor in module.state_dict().items():  # 0.weight, 0.bias, 1.weight, 1.bias, steps
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.numpy().tobytes())
    assert module_weights_id(module) == digest.hexdigest()[:16]


def test_same_values_same_id_any_change_another():
    reference = module_weights_id(_module())
    assert module_weights_id(_module()) == reference  # another instance, same values
    assert module_weights_id(_module(seed=1)) != reference
    changed = _module()
    with torch.no_grad():
        changed[0].weight[2, 1] += 1e-6  # one value, below any tolerance a metric would notice
    assert module_weights_id(changed) != reference
    assert module_weights_id(_module().to(torch.float64)) != reference  # same numbers, other dtype
    transposed = _module()
    with torch.no_grad():  # same bytes, other shape: the shape is part of the id
        transposed[0].weight = torch.nn.Parameter(transposed[0].weight.detach().reshape(3, 4).clone())
    assert module_weights_id(transposed) != reference


def test_non_contiguous_and_bfloat16_tensors_hash_by_their_values():
    module = _module().to(torch.bfloat16)
    expected = module_weights_id(module)
    with torch.no_grad():  # the same values held through a transposed (non-contiguous) view
        weight = module[0].weight.detach().t().contiguous().t()
        assert not weight.is_contiguous()
        module[0].weight = torch.nn.Parameter(weight)
    assert module_weights_id(module) == expected
