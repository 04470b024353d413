"""What the tests of vlmflow's attention functions share (transformers' attention-function
interface: module, query, key, value (B, H, T, D), mask; returns ((B, T, H, D), weights))."""

import torch


class Attn(torch.nn.Module):
    """The attributes transformers' SDPA function reads off the attention module."""

    is_causal = False
    num_key_value_groups = 1


def out_and_grads(fn, q, k, v, mask, grad):
    """`fn`'s output and the gradients of q, k, v for the output gradient `grad`."""
    leaves = [x.clone().requires_grad_(True) for x in (q, k, v)]
    out, _ = fn(Attn(), *leaves, mask, scaling=0.3)
    out.backward(grad)
    return out.detach(), [x.grad for x in leaves]


def device_reads(monkeypatch) -> list:
    """The shapes of the tensors read to the host (`Tensor.tolist`) from now on."""
    calls = []
    real = torch.Tensor.tolist

    def counting(self):
        calls.append(self.shape)
        return real(self)

    monkeypatch.setattr(torch.Tensor, "tolist", counting)
    return calls
