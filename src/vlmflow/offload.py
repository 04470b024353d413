"""Memory tricks that move training state to host memory: offloaded activation checkpointing
(`use_gradient_checkpointing: offload`) and input embeddings kept on the CPU
(`model.offload_embeddings`)."""

from __future__ import annotations

import contextlib
import logging
import weakref

import torch

log = logging.getLogger(__name__)


class HostEmbedding(torch.nn.Module):
    """A frozen input-embedding module kept in host memory (`model.offload_embeddings`).

    Token ids are looked up on the CPU by the original module (so scaled embeddings keep their
    scale) and the (B, T, d) result is copied to `device`. Only used when the table is frozen
    and not tied to the output head."""

    def __init__(self, embedding: torch.nn.Module, device: torch.device):
        super().__init__()
        self.inner = embedding.to("cpu")
        self.inner.requires_grad_(False)
        self.device = device

    @property
    def weight(self):
        return self.inner.weight

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        out = self.inner(input_ids.to("cpu"))
        if self.device.type == "cuda":
            out = out.pin_memory()
        return out.to(self.device, non_blocking=True)


def offload_input_embeddings(model, device: torch.device, lora_cfg: dict) -> bool:
    """Replace the input embeddings by a HostEmbedding when that is safe. Returns whether it
    did (tied to lm_head, or trained through modules_to_save: left alone)."""
    embedding = model.get_input_embeddings()
    head = model.get_output_embeddings()
    if isinstance(embedding, HostEmbedding):
        return True
    tied = head is not None and head.weight.data_ptr() == embedding.weight.data_ptr()
    trained = any("embed" in m for m in lora_cfg["modules_to_save"])
    if tied or trained:
        log.info(
            "model.offload_embeddings: not applied (%s)", "tied to lm_head" if tied else "trained"
        )
        return False
    model.set_input_embeddings(HostEmbedding(embedding, device))
    return True


def _same_layout(t: torch.Tensor, device, pin_memory: bool = False) -> torch.Tensor:
    """An empty tensor on `device` with `t`'s size and strides (`torch.empty_like` keeps the
    strides of a dense tensor, e.g. a transposed view; others become contiguous). A restored
    layer input must keep its layout: a compiled layer's graph asserts its inputs' strides
    (Gemma 3's SigLIP patch embeddings are a transposed view: offloaded contiguous, its 4-bit
    backward failed on an H200)."""
    return torch.empty_like(t, device=device, pin_memory=pin_memory)


class _Offloaded:
    """One saved tensor living in host memory (and, once prefetched, again on the GPU)."""

    __slots__ = ("__weakref__", "device", "host", "ready", "gpu", "gpu_ready", "call")

    def __init__(self, device, host, ready, call):
        self.device, self.host, self.ready, self.call = device, host, ready, call
        self.gpu = self.gpu_ready = None


class OffloadedCheckpoint:
    """Gradient checkpointing whose saved layer inputs live on the CPU (Unsloth's "unsloth"
    mode, `use_gradient_checkpointing: offload`).

    Non-reentrant `torch.utils.checkpoint` keeps only a layer's inputs for the backward pass and
    saves them through autograd's saved-tensor mechanism; under this object's
    `saved_tensors_hooks` they are copied to host memory and back when the backward pass
    recomputes the layer. Activations inside the layer are recomputed as usual, so the numerics
    equal plain checkpointing's.

    On CUDA the copies run on a side stream: the device-to-host copy overlaps the next layers'
    forward, and when the backward pass restores layer i's inputs it starts copying layer
    i-1's back (double buffering), so the compute stream rarely waits for the PCIe link.
    Tensors saved by several layers (rotary tables, masks) are copied once; tensors under
    `min_bytes` stay where they are.
    """

    def __init__(self, min_bytes: int = 0):
        self.min_bytes = min_bytes
        self.offloaded_bytes = 0
        self.restored = 0
        self.prefetched = 0
        self._call = 0
        self._entries: list[weakref.ref] = []  # in pack order
        # id(tensor) -> (weakref(tensor), version, weakref(entry)): autograd alone owns entries
        self._seen: dict[int, tuple] = {}
        self._streams: dict[torch.device, torch.cuda.Stream] = {}
        self._keep: frozenset[int] = frozenset()  # storages that stay put (`saving`)

    def _copy_stream(self, device):
        if device not in self._streams:
            self._streams[device] = torch.cuda.Stream(device)
        return self._streams[device]

    def _pack(self, t: torch.Tensor):
        if t.numel() * t.element_size() < self.min_bytes:
            return t
        if self._keep and t.untyped_storage().data_ptr() in self._keep:
            return t  # a weight of the layer (a compiled checkpoint saves them too)
        seen = self._seen.get(id(t))
        if seen is not None and seen[0]() is t and seen[1] == t._version:
            entry = seen[2]()
            if entry is not None:
                return entry
        if t.device.type == "cuda":
            compute = torch.cuda.current_stream(t.device)
            stream = self._copy_stream(t.device)
            stream.wait_stream(compute)
            host = _same_layout(t, "cpu", pin_memory=True)
            with torch.cuda.stream(stream):
                host.copy_(t, non_blocking=True)
                ready = torch.cuda.Event()
                ready.record(stream)
            t.record_stream(stream)  # its memory is not reused before the copy is done
        else:
            host, ready = t.detach().clone(), None  # clone keeps the strides too
        entry = _Offloaded(t.device, host, ready, self._call)
        self.offloaded_bytes += t.numel() * t.element_size()
        self._seen[id(t)] = (weakref.ref(t), t._version, weakref.ref(entry))
        self._entries.append(weakref.ref(entry))
        return entry

    def _fetch(self, entry: _Offloaded) -> None:
        """Start copying `entry` back to its GPU on the side stream."""
        compute = torch.cuda.current_stream(entry.device)
        stream = self._copy_stream(entry.device)
        gpu = _same_layout(entry.host, entry.device)
        stream.wait_stream(compute)
        with torch.cuda.stream(stream):
            stream.wait_event(entry.ready)
            gpu.copy_(entry.host, non_blocking=True)
            entry.gpu_ready = torch.cuda.Event()
            entry.gpu_ready.record(stream)
        gpu.record_stream(stream)
        entry.gpu = gpu

    def _unpack(self, packed) -> torch.Tensor:
        if isinstance(packed, torch.Tensor):
            return packed
        entry = packed
        self.restored += 1
        if entry.device.type != "cuda":
            return entry.host.to(entry.device)
        if entry.gpu is None:
            self._fetch(entry)
        else:
            self.prefetched += 1
        torch.cuda.current_stream(entry.device).wait_event(entry.gpu_ready)
        gpu = entry.gpu
        self._prefetch_before(entry.call)
        return gpu

    def _prefetch_before(self, call: int) -> None:
        """Start restoring the inputs of the checkpointed call before `call` (the layer the
        backward pass reaches next)."""
        alive = []
        for ref in self._entries:
            e = ref()
            if e is None:
                continue
            alive.append(ref)
            if e.call == call - 1 and e.gpu is None:
                self._fetch(e)
        self._entries = alive

    @contextlib.contextmanager
    def saving(self, keep: frozenset[int] = frozenset()):
        """The tensors autograd saves inside this context (one checkpointed layer call) go to
        host memory, except those whose storage's data pointer is in `keep` (the layer's
        weights: a compiled checkpoint, `patches._compiled_checkpoint`, saves the weights its
        backward graph recomputes with beside the layer's inputs)."""
        self._call += 1
        if len(self._seen) > 4096:
            self._seen = {k: v for k, v in self._seen.items() if v[2]() is not None}
        self._keep = keep
        try:
            with torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack):
                yield
        finally:
            self._keep = frozenset()

    def __call__(self, function, *args, **kwargs):
        from torch.utils.checkpoint import checkpoint

        with self.saving():
            return checkpoint(function, *args, use_reentrant=False, **kwargs)


def offload_checkpointed_layers(model) -> OffloadedCheckpoint:
    """Make every checkpointed layer of `model` (gradient checkpointing already enabled) keep its
    saved inputs in host memory. Returns the offloader."""
    # on a GPU, tensors under 1 MiB are not worth a copy's latency; on the CPU (tests) move all
    on_gpu = next(model.parameters()).device.type == "cuda"
    offloader = OffloadedCheckpoint(min_bytes=(1 << 20) if on_gpu else 0)
    n = 0
    for module in model.modules():
        if getattr(module, "gradient_checkpointing", False) and hasattr(
            module, "_gradient_checkpointing_func"
        ):
            module._gradient_checkpointing_func = offloader
            n += 1
    if n == 0:
        raise ValueError(f"{type(model).__name__} has no checkpointed layers to offload")
    return offloader
