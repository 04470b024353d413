"""The training recipe: setup → train → save, in one visible loop.

Data order is a pure function of (seed, step): optimizer step `s`, micro-batch `m`, slot `i`
reads global sample position `p = (s * accum + m) * batch + i`, i.e. epoch `p // n`, index
`perm(seed + epoch)[p % n]`. Resuming at step `s` therefore needs no saved iterator state.
`train.group_by_length` only re-sorts the samples a rank reads in one step among its
micro-batches (`group_by_length`); `train.packing` packs each micro-batch's samples into rows
(`vlmflow.collate.collate_packed`). Neither changes which samples a step sees.
Checkpoints (trainable weights, optimizer, scheduler, RNG) go to a work folder outside the rule's
outputs, atomically, every `save_steps`; a re-run resumes from the newest one whose fingerprint
(config + data) matches.

`train_step` (one optimizer step over a list of micro-batches) and
`vlmflow.modeling.build_training_model` are the pieces benchmarks call, so that what they time
is what the train rule runs.
"""

from __future__ import annotations

import atexit
import hashlib
import json
import logging
import math
import os
import shutil
import time
import weakref
from dataclasses import dataclass
from pathlib import Path

import torch

from .collate import (
    Encoder,
    collate,
    collate_packed,
    count_tokens,
    model_inputs,
    rope_index_fn,
)
from .distributed import DistContext
from .fast import label_only_loss, label_positions
from .io import atomic_dir, atomic_file, write_json
from .modeling import build_training_model, count_parameters, pick_device, resolve_dtype
from .preempt import Preempted

log = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    pass


# ----------------------------------------------------------------------------------- data order
def epoch_permutation(n: int, seed: int, epoch: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g)


def sample_indices(n: int, seed: int, step: int, micro: int, accum: int, batch: int) -> list[int]:
    """Dataset indices of micro-batch `micro` of optimizer step `step` (see module docstring)."""
    out = []
    cache: dict[int, torch.Tensor] = {}
    for i in range(batch):
        p = (step * accum + micro) * batch + i
        epoch = p // n
        if epoch not in cache:
            cache[epoch] = epoch_permutation(n, seed, epoch)
        out.append(int(cache[epoch][p % n]))
    return out


def step_micro_batches(
    n: int, seed: int, step: int, accum: int, global_batch: int, shard=None
) -> list[list[int]]:
    """Dataset indices of every micro-batch of optimizer step `step` (this rank's `shard` of
    each global micro-batch of `global_batch`)."""
    shard = shard or (lambda x: x)
    return [shard(sample_indices(n, seed, step, m, accum, global_batch)) for m in range(accum)]


def group_by_length(micro_batches: list[list[int]], lengths) -> list[list[int]]:
    """The same indices, sorted by `lengths[index]` (longest first; ties keep their order) and
    cut into micro-batches of the same sizes: each micro-batch then holds samples of similar
    length. Deterministic; the union of the micro-batches (what the optimizer step sees) is
    unchanged."""
    flat = [i for mb in micro_batches for i in mb]
    order = sorted(range(len(flat)), key=lambda j: (-lengths[flat[j]], j))
    out, pos = [], 0
    for mb in micro_batches:
        out.append([flat[j] for j in order[pos : pos + len(mb)]])
        pos += len(mb)
    return out


PACKING_ATTENTION = ("sdpa", "eager")


def check_packing(family, attn_implementation: str) -> None:
    """Raise a clear error when `train.packing` cannot work for this model."""
    if not family.supports_packing:
        from .families import FAMILIES

        ok = ", ".join(f.name for f in FAMILIES.values() if f.supports_packing)
        why = f": {family.packing_refusal}" if getattr(family, "packing_refusal", "") else ""
        raise ValueError(
            f"train.packing is not supported for the '{family.name}' family (only {ok}){why}; "
            "set train.packing: false (train.group_by_length reduces padding for any family)"
        )
    if attn_implementation not in PACKING_ATTENTION:
        raise ValueError(
            f"train.packing needs model.attn_implementation in {list(PACKING_ATTENTION)}, got "
            f"'{attn_implementation}' (its packed mask is built from position ids only for those)"
        )


def total_steps(train_cfg: dict, n_samples: int, world_size: int = 1) -> int:
    if train_cfg["max_steps"] is not None:
        return train_cfg["max_steps"]
    per_step = (
        train_cfg["per_device_train_batch_size"]
        * train_cfg["gradient_accumulation_steps"]
        * world_size
    )
    return max(1, math.ceil(n_samples * train_cfg["num_train_epochs"] / per_step))


class EncodedRows:
    """Rows encoded on demand (optionally memoised)."""

    def __init__(self, rows: list[dict], encoder: Encoder, cache: bool):
        self.rows, self.encoder, self.cache = rows, encoder, {} if cache else None

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        if self.cache is not None and i in self.cache:
            return self.cache[i]
        item = self.encoder(self.rows[i])
        if self.cache is not None:
            self.cache[i] = item
        return item


class StepBatches(torch.utils.data.Dataset):
    """Item k = the collated micro-batches of optimizer step `first + k` (a list of dicts), so
    that a DataLoader's worker processes can prepare the next steps during the current one."""

    def __init__(self, make_step, first: int, last: int):
        self.make_step, self.first, self.last = make_step, first, last

    def __len__(self) -> int:
        return max(0, self.last - self.first)

    def __getitem__(self, k: int) -> list[dict]:
        return self.make_step(self.first + k)


def _leave_stop_signals_to_the_trainer(_worker_id: int) -> None:
    """DataLoader workers ignore the preemption signals (SLURM sends them to every process of
    the job): the training process alone reacts, checkpoints at the step boundary and then shuts
    the workers down; a worker killed by the signal would abort the step instead."""
    import signal

    from .preempt import DEFAULT_SIGNALS

    for signum in DEFAULT_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)


class Prefetcher:
    """Iterator over step batches made by DataLoader workers; `close()` stops the workers (the
    train loop calls it in a `finally`, and it runs at interpreter exit as a safety net: the
    workers ignore SIGTERM, so they must be asked to stop rather than terminated)."""

    def __init__(self, iterator):
        self._it = iterator
        atexit.register(_close_prefetcher, weakref.ref(self))

    def __iter__(self):
        return self

    def __next__(self) -> list[dict]:
        if self._it is None:
            raise StopIteration
        return next(self._it)

    def close(self) -> None:
        it, self._it = self._it, None
        if it is not None and hasattr(it, "_shutdown_workers"):
            it._shutdown_workers()


def _close_prefetcher(ref) -> None:
    prefetcher = ref()
    if prefetcher is not None:
        prefetcher.close()


def step_batches(make_step, first: int, last: int, workers: int, pin: bool):
    """Iterator over the micro-batch lists of steps first..last-1, prepared by `workers`
    background processes (2 steps ahead each; a `Prefetcher`), or inline when workers == 0."""
    if workers == 0:
        return (make_step(s) for s in range(first, last))
    return Prefetcher(
        iter(
            torch.utils.data.DataLoader(
                StepBatches(make_step, first, last),
                batch_size=None,
                num_workers=workers,
                prefetch_factor=2,
                pin_memory=pin,
                worker_init_fn=_leave_stop_signals_to_the_trainer,
            )
        )
    )


# ------------------------------------------------------------------------------------ optimizer
def build_optimizer(params, train_cfg: dict, device: torch.device):
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    groups = [
        {"params": decay, "weight_decay": train_cfg["weight_decay"]},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    name, lr = train_cfg["optim"], train_cfg["learning_rate"]
    if name == "adamw_torch":
        return torch.optim.AdamW(groups, lr=lr, fused=device.type == "cuda")
    import bitsandbytes as bnb

    cls = {
        "adamw_8bit": bnb.optim.AdamW8bit,
        "paged_adamw_8bit": bnb.optim.PagedAdamW8bit,
        "paged_adamw": bnb.optim.PagedAdamW,
        "paged_adamw_32bit": bnb.optim.PagedAdamW32bit,
    }[name]
    return cls(groups, lr=lr)


def build_scheduler(optimizer, train_cfg: dict, steps: int):
    from transformers import get_scheduler

    return get_scheduler(
        train_cfg["lr_scheduler_type"],
        optimizer,
        num_warmup_steps=train_cfg["warmup_steps"],
        num_training_steps=steps,
    )


# ----------------------------------------------------------------------------------- checkpoints
def fingerprint(cfg: dict, data_files: list[str]) -> str:
    h = hashlib.sha256(json.dumps(cfg, sort_keys=True).encode())
    for f in data_files:
        h.update(hashlib.sha256(Path(f).read_bytes()).digest())
    return h.hexdigest()[:16]


def trainable_state(model) -> dict[str, torch.Tensor]:
    return {
        n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad
    }


def save_checkpoint(
    work_dir: Path, step: int, model, optimizer, scheduler, fp: str, scaler=None
) -> Path:
    from safetensors.torch import save_file

    final = work_dir / f"checkpoint-{step:08d}"
    with atomic_dir(final) as tmp:
        save_file(trainable_state(model), tmp / "trainable.safetensors")
        torch.save(
            {
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "rng_cpu": torch.get_rng_state(),
                "rng_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
                **({"scaler": scaler.state_dict()} if scaler is not None else {}),
            },
            tmp / "state.pt",
        )
        write_json(tmp / "meta.json", {"step": step, "fingerprint": fp})
    for old in sorted(work_dir.glob("checkpoint-*"))[:-2]:  # keep the two newest
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(work_dir: Path, fp: str) -> Path | None:
    for ckpt in sorted(work_dir.glob("checkpoint-*"), reverse=True):
        meta = ckpt / "meta.json"
        if meta.exists() and json.loads(meta.read_text())["fingerprint"] == fp:
            return ckpt
    return None


def load_checkpoint(ckpt: Path, model, optimizer, scheduler, scaler=None) -> int:
    from safetensors.torch import load_file

    weights = load_file(ckpt / "trainable.safetensors")
    params = dict(model.named_parameters())
    with torch.no_grad():
        for n, t in weights.items():
            params[n].copy_(t)
    state = torch.load(ckpt / "state.pt", weights_only=True)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    if scaler is not None and "scaler" in state:
        scaler.load_state_dict(state["scaler"])
    torch.set_rng_state(state["rng_cpu"])
    if state["rng_cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["rng_cuda"])
    return json.loads((ckpt / "meta.json").read_text())["step"]


# ------------------------------------------------------------------------------------- the step
@dataclass
class StepResult:
    loss: float
    grad_norm: float
    lr: float
    tokens: int


def train_step(
    model,
    micro_batches: list[dict[str, torch.Tensor]],
    optimizer,
    scheduler,
    params: list[torch.Tensor],
    *,
    max_grad_norm: float,
    device: torch.device,
    ctx: DistContext | None = None,
    scaler: torch.amp.GradScaler | None = None,
) -> StepResult:
    """One optimizer step over `micro_batches` (gradient accumulation).

    The loss is the mean over every answer token of the step (each micro-batch's summed token
    loss is divided by the step's token count, `num_items_in_batch`), so accumulation gives the
    same gradient as one big batch. Raises NonFiniteLossError before touching the weights.
    `scaler` (fp16 compute): the loss is scaled before the backward pass and the gradients
    unscaled before clipping; a step whose gradients overflow is skipped and the scale lowered.
    """
    ctx = ctx if ctx is not None else DistContext(device=device)
    # Under data parallelism the counts are global, so every rank's loss is its share of the
    # global mean and the all-reduced (summed) gradient equals the single-process gradient.
    # label positions found on the CPU (once per micro-batch: they also give the step's count)
    positions = [label_positions(b["labels"]) for b in micro_batches]
    n_items = ctx.sum(sum(int(index.numel()) for index, _ in positions))
    n_tokens = ctx.sum(sum(count_tokens(b) for b in micro_batches))
    loss_sum = torch.zeros((), device=device)
    pin = device.type == "cuda"

    def to_device(t: torch.Tensor) -> torch.Tensor:
        # from pinned memory (a no-op for what the DataLoader workers pinned already): a copy
        # from pageable memory may wait for the GPU to finish its queued work
        return (t.pin_memory() if pin else t).to(device, non_blocking=True)

    for batch, (index, targets) in zip(micro_batches, positions):  # padded or packed batches
        index, targets = to_device(index), to_device(targets)
        batch = {k: to_device(v) for k, v in model_inputs(batch).items()}
        loss = label_only_loss(model, batch, num_items_in_batch=n_items, positions=(index, targets))
        (scaler.scale(loss) if scaler is not None else loss).backward()
        loss_sum += loss.detach()
    ctx.all_reduce_grads(params)
    loss = float(ctx.sum(loss_sum))
    if not math.isfinite(loss):
        optimizer.zero_grad(set_to_none=True)
        raise NonFiniteLossError(f"loss is {loss}")
    if scaler is not None:
        scaler.unscale_(optimizer)  # true gradients for clipping and the log
    if max_grad_norm > 0:
        grad_norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
    else:  # for the log only: one fused kernel group, read after the optimizer step
        grads = [p.grad for p in params if p.grad is not None]
        grad_norm = (
            torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads))) if grads else None
        )
    lr = scheduler.get_last_lr()[0]
    if scaler is not None:  # skips the update when a gradient overflowed, then lowers the scale
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    grad_norm = float(grad_norm) if grad_norm is not None else 0.0
    return StepResult(loss=loss, grad_norm=grad_norm, lr=lr, tokens=n_tokens)


def peak_memory(device: torch.device) -> dict:
    """Peak accelerator memory allocated by tensors (GiB; None on the CPU) and the process's
    peak resident host memory (GiB)."""
    import resource

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
    gpu = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return {
        "peak_mem_gib": None if gpu is None else round(gpu, 3),
        "peak_rss_gib": round(rss, 3),
    }


# ------------------------------------------------------------------------------------- the loop
@dataclass
class TrainResult:
    steps: int
    final_loss: float
    resumed_from: int
    log_path: Path
    model: object = None
    """The trained PeftModel (for callers that keep using it in-process)."""


def train(
    cfg: dict,
    train_rows: list[dict],
    out_dir: str | os.PathLike,
    work_dir: str | os.PathLike,
    data_files: list[str] = (),
    preempt=None,
    dist_ctx: DistContext | None = None,
) -> TrainResult:
    """Fine-tune with LoRA and write the adapter to `out_dir`.

    `cfg` holds the resolved `model`, `lora` and `train` sections. `preempt` (a
    `preempt.PreemptionHandler`) is checked at every step boundary: when it was signalled, a
    checkpoint is written and `Preempted` is raised. `dist_ctx` (from
    `distributed.init_distributed`) makes this one of several data-parallel ranks.
    """
    model_cfg, train_cfg = cfg["model"], cfg["train"]
    out_dir, work_dir = Path(out_dir), Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(train_cfg["seed"])

    # ---- setup
    ctx = dist_ctx if dist_ctx is not None else DistContext(device=pick_device())
    device = ctx.device
    if train_cfg["packing"]:
        from .modeling import model_family

        check_packing(model_family(model_cfg["name"], model_cfg), model_cfg["attn_implementation"])
    model, processor, family = build_training_model(cfg, device)
    trainable, total = count_parameters(model)
    log.info("trainable parameters: %d of %d (%.2f%%)", trainable, total, 100 * trainable / total)
    encoder = Encoder(
        processor,
        family,
        max_seq_length=model_cfg["max_seq_length"],
        train_on_responses_only=train_cfg["train_on_responses_only"],
        min_pixels=model_cfg["min_pixels"],
        max_pixels=model_cfg["max_pixels"],
    )
    data = EncodedRows(train_rows, encoder, cache=train_cfg["cache_encoded"])
    if len(data) == 0:
        raise ValueError("the train split is empty")
    steps = total_steps(train_cfg, len(data), ctx.world_size)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_optimizer(params, train_cfg, device)
    # fp16 compute (GPUs without bf16): dynamic loss scaling keeps small gradients from
    # underflowing; bf16 and fp32 need none
    fp16 = resolve_dtype(model_cfg["dtype"], device) == torch.float16
    scaler = torch.amp.GradScaler(device.type) if fp16 else None
    if fp16 and any(p.dtype == torch.float16 for p in params):
        raise ValueError(
            "lora.modules_to_save trains whole modules in the model's dtype, and fp16 weights "
            "cannot be trained with loss scaling: with model.dtype float16 leave "
            "lora.modules_to_save empty (or use bfloat16/float32)"
        )
    scheduler = build_scheduler(optimizer, train_cfg, steps)
    fp = fingerprint(cfg, list(data_files))
    start = 0
    ckpt = latest_checkpoint(work_dir, fp)
    if ckpt is not None:
        start = load_checkpoint(ckpt, model, optimizer, scheduler, scaler)
        log.info("resumed from %s (step %d)", ckpt, start)
    ctx.broadcast_params(params)
    log_path = work_dir / "train_log.jsonl"
    if ctx.is_main:
        _truncate_log(log_path, start)

    # ---- train
    bs, accum = train_cfg["per_device_train_batch_size"], train_cfg["gradient_accumulation_steps"]
    global_bs = bs * ctx.world_size  # each rank takes its shard of every global micro-batch
    if train_cfg["packing"]:
        rope_index = rope_index_fn(model)

        def make_batch(samples):
            return collate_packed(samples, encoder.pad_id, rope_index, model_cfg["max_seq_length"])
    else:

        def make_batch(samples):
            return collate(samples, encoder.pad_id, family.batch_layout)

    model.train()
    loss_value = float("nan")
    t_start = time.perf_counter()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()

    def make_step(step: int) -> list[dict]:
        indices = step_micro_batches(
            len(data), train_cfg["seed"], step, accum, global_bs, ctx.shard
        )
        encoded = {i: data[i] for mb in indices for i in mb}
        if train_cfg["group_by_length"]:
            lengths = {i: s["input_ids"].shape[0] for i, s in encoded.items()}
            indices = group_by_length(indices, lengths)
        return [make_batch([encoded[i] for i in mb]) for mb in indices]

    workers = 0 if train_cfg["cache_encoded"] else train_cfg["dataloader_workers"]
    batches = step_batches(make_step, start, steps, workers, pin=device.type == "cuda")
    try:
        for step in range(start, steps):
            t0 = time.perf_counter()
            micro_batches = next(batches)
            try:
                res = train_step(
                    model,
                    micro_batches,
                    optimizer,
                    scheduler,
                    params,
                    max_grad_norm=train_cfg["max_grad_norm"],
                    device=device,
                    ctx=ctx,
                    scaler=scaler,
                )
            except NonFiniteLossError as e:
                raise NonFiniteLossError(
                    f"{e} at step {step + 1}; stopped. The last good checkpoint (if any) is kept in "
                    f"{work_dir}. Lower train.learning_rate or check the data."
                ) from None
            loss_value = res.loss
            dt = time.perf_counter() - t0
            record = {
                "step": step + 1,
                "loss": round(res.loss, 6),
                "lr": res.lr,
                "grad_norm": round(res.grad_norm, 6),
                "tokens": res.tokens,
                "tokens_per_s": round(res.tokens / dt, 1),
                "step_s": round(dt, 4),
                "elapsed_s": round(time.perf_counter() - t_start, 2),
                **peak_memory(device),
            }
            if ctx.is_main:
                with open(log_path, "a") as f:
                    f.write(json.dumps(record) + "\n")
            if (step + 1) % train_cfg["logging_steps"] == 0 or step + 1 == steps:
                log.info(
                    "step %d/%d loss %.4f lr %.2e grad_norm %.3f %.0f tok/s",
                    step + 1,
                    steps,
                    res.loss,
                    res.lr,
                    res.grad_norm,
                    record["tokens_per_s"],
                )
            saved = False
            if (
                train_cfg["save_steps"]
                and (step + 1) % train_cfg["save_steps"] == 0
                and step + 1 < steps
            ):
                if ctx.is_main:
                    save_checkpoint(work_dir, step + 1, model, optimizer, scheduler, fp, scaler)
                saved = True
            if step + 1 < steps and ctx.any(preempt is not None and preempt.requested):
                ckpt = work_dir / f"checkpoint-{step + 1:08d}"
                if ctx.is_main and not saved:
                    ckpt = save_checkpoint(
                        work_dir, step + 1, model, optimizer, scheduler, fp, scaler
                    )
                ctx.barrier()  # no rank exits before the checkpoint is complete
                raise Preempted(getattr(preempt, "signame", "stop request"), step + 1, steps, ckpt)
    finally:
        if isinstance(batches, Prefetcher):
            batches.close()  # stop the workers now, also on Preempted or an error

    # ---- save
    if not ctx.is_main:
        ctx.barrier()
        return TrainResult(steps, loss_value, start, out_dir / "train_log.jsonl")
    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        write_json(tmp / "vlmflow_train_config.json", cfg)
        shutil.copy(log_path, tmp / "train_log.jsonl")
        write_json(
            tmp / "train_summary.json",
            {
                "steps": steps,
                "final_loss": loss_value,
                "resumed_from_step": start,
                "trainable_parameters": trainable,
                "total_parameters": total,
                "family": family.name,
                "device": str(device),
                "world_size": ctx.world_size,
                "train_samples": len(data),
            },
        )
        plot_training_log(tmp / "train_log.jsonl", tmp / "loss.png")
    ctx.barrier()
    return TrainResult(
        steps=steps,
        final_loss=loss_value,
        resumed_from=start,
        log_path=out_dir / "train_log.jsonl",
        model=model,
    )


def _truncate_log(path: Path, step: int) -> None:
    """Keep only records of steps ≤ `step` (a resumed run rewrites what came after)."""
    if not path.exists():
        return
    keep = [
        line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= step
    ]
    with atomic_file(path) as tmp:
        tmp.write_text("".join(line + "\n" for line in keep))


def read_log(path: str | os.PathLike) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line]


def plot_training_log(log_path: str | os.PathLike, png: str | os.PathLike) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_log(log_path)
    steps = [r["step"] for r in records]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.5))
    fig.subplots_adjust(left=0.08, right=0.98, bottom=0.15, top=0.9, wspace=0.3)
    ax1.plot(steps, [r["loss"] for r in records])
    ax1.set_xlabel("step")
    ax1.set_ylabel("loss")
    ax1.set_yscale("log")
    ax1.set_title("training loss")
    ax2.plot(steps, [r["lr"] for r in records], color="tab:orange")
    ax2.set_xlabel("step")
    ax2.set_ylabel("learning rate")
    ax2.set_title("learning rate")
    fig.savefig(png, dpi=80)
    plt.close(fig)
