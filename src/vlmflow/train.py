"""The training recipe: setup → train → save, in one visible loop.

Data order is a pure function of (seed, step): optimizer step `s`, micro-batch `m`, slot `i`
reads global sample position `p = (s * accum + m) * batch + i`, i.e. epoch `p // n`, index
`perm(seed + epoch)[p % n]`. Resuming at step `s` therefore needs no saved iterator state.
`train.group_by_length` only re-sorts the samples a rank reads in one step among its
micro-batches (`group_by_length`); `train.packing` packs each micro-batch's samples into rows
(`vlmflow.collate.collate_packed`). Neither changes which samples a step sees.
Checkpoints (trainable weights, optimizer, scheduler, RNG) go to a work folder outside the rule's
outputs, atomically, every `save_steps` / `save_minutes` and on a stop signal, with the sha256 of
each file; a re-run resumes from the newest one that verifies and was made with the same
identity (settings but those of `RESUME_IGNORES`, data, base model, ranks), and logs why it passed
over any newer one. One trainer at a time holds the work folder (`lock_work_dir`).

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

from .artifacts import TrainSummary
from .collate import (
    Encoder,
    collate,
    collate_packed,
    count_tokens,
    model_inputs,
    rope_index_fn,
    without_padding_mask,
)
from .distributed import DistContext
from .errors import VlmflowError
from .io import atomic_dir, atomic_file, write_json
from .loss import label_positions, model_loss
from .modeling import build_training_model, count_parameters, pick_device, resolve_dtype
from .preempt import Preempted

log = logging.getLogger(__name__)


class NonFiniteLossError(VlmflowError, RuntimeError):
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
# What a checkpoint may be resumed across. Every other key of the model, lora and train sections
# (data, model identity, LoRA shape, optimizer, schedule, seed, batch, ...) is part of the run's
# identity, as are the sha256 of the data files and of the base model and the number of ranks;
# a checkpoint made with another identity is not resumed and the log says what differs. These
# keys only change how fast, where or how verbosely the same optimisation runs (the
# recomputation and compilation knobs give the same numbers up to rounding).
RESUME_IGNORES = {
    "model": ("attn_implementation", "offload_embeddings", "trust_remote_code"),
    "train": (
        "logging_steps",
        "save_steps",
        "save_minutes",
        "threads",
        "dataloader_workers",
        "cache_encoded",
        "compile",
        "fast_paths",
        "use_gradient_checkpointing",
        "gpus",  # the number of ranks (gpus x nodes) is part of the identity instead
        "nodes",
    ),
}
CHECKPOINT_FILES = ("trainable.safetensors", "state.pt")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be resumed (damaged, non-finite); the message says why."""


class CheckpointWriteError(VlmflowError, RuntimeError):
    """Writing a checkpoint failed (no space left, quota); the older checkpoints are kept."""


class WorkDirBusy(VlmflowError, RuntimeError):
    """Another trainer holds the work folder's lock."""


def base_model_hashes(model_cfg: dict, cache: Path | None = None) -> dict[str, str]:
    """What identifies the base weights: the sha256 of every file of a local folder (cached in
    `cache`, keyed by size, mtime, ctime and inode: a file is hashed again only once it changed),
    or the resolved commit of a hub model in the local cache."""
    name = model_cfg["name"]
    if not Path(name).is_dir():
        try:
            from huggingface_hub import snapshot_download

            folder = Path(
                snapshot_download(name, revision=model_cfg["revision"], local_files_only=True)
            )
            commit = folder.name if folder.parent.name == "snapshots" else str(folder)
        except Exception:  # not in the cache: from_pretrained will say so
            commit = "unresolved"
        return {"hub commit": commit}
    from .archive import sha256_file

    old = {}
    if cache is not None and cache.exists():
        try:
            old = json.loads(cache.read_text())
        except ValueError:
            old = {}
    new, out, hashed = {}, {}, 0
    t0 = time.perf_counter()
    for p in sorted(Path(name).rglob("*")):
        if not p.is_file():
            continue
        st = p.stat()
        key = [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]
        entry = old.get(str(p.resolve()))
        if entry is None or entry.get("key") != key:
            entry = {"key": key, "sha256": sha256_file(p)}
            hashed += st.st_size
        new[str(p.resolve())] = entry
        out[str(p.relative_to(name))] = entry["sha256"]
    if hashed:
        log.info(
            "sha256 of the base model's files: %.2f GB hashed in %.1f s (again only when a "
            "file changes)",
            hashed / 1e9,
            time.perf_counter() - t0,
        )
    if cache is not None and new != old:
        write_json(cache, new)
    return out


def run_identity(
    cfg: dict, data_files: list[str], world_size: int = 1, model_hashes: dict | None = None
) -> dict:
    """What a checkpoint must share with this run to be resumed (see RESUME_IGNORES)."""
    return {
        "config": {
            f"{section}.{k}": v
            for section in ("model", "lora", "train")
            for k, v in sorted(cfg.get(section, {}).items())
            if k not in RESUME_IGNORES.get(section, ())
        },
        "data": {
            Path(f).name: hashlib.sha256(Path(f).read_bytes()).hexdigest() for f in data_files
        },
        "base_model": dict(model_hashes or {}),
        "world_size": world_size,
    }


def fingerprint(identity: dict) -> str:
    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[
        :16
    ]


def identity_differences(old: dict | None, new: dict) -> list[str]:
    """What differs between a checkpoint's identity and this run's, in words."""
    if not isinstance(old, dict):
        return ["it records no settings (made by an older vlmflow)"]
    out = []

    def show(v):
        return json.dumps(v, default=str)

    oc, nc = old.get("config", {}), new["config"]
    for k in sorted(set(oc) | set(nc)):
        if k not in oc:
            out.append(f"{k} is new ({show(nc[k])})")
        elif k not in nc:
            out.append(f"{k} is gone (was {show(oc[k])})")
        elif show(oc[k]) != show(nc[k]):
            out.append(f"{k} was {show(oc[k])}, now {show(nc[k])}")
    od, nd = old.get("data", {}), new["data"]
    if od != nd:
        changed = sorted(k for k in set(od) | set(nd) if od.get(k) != nd.get(k))
        out.append(f"the training data changed ({', '.join(changed)})")
    ob, nb = old.get("base_model", {}), new["base_model"]
    if ob != nb:
        changed = sorted(k for k in set(ob) | set(nb) if ob.get(k) != nb.get(k))
        more = f" and {len(changed) - 3} more" if len(changed) > 3 else ""
        out.append(f"the base model's files changed ({', '.join(changed[:3])}{more})")
    if old.get("world_size") != new["world_size"]:
        out.append(f"it was made by {old.get('world_size')} rank(s), now {new['world_size']}")
    return out or ["its fingerprint differs"]


def trainable_state(model) -> dict[str, torch.Tensor]:
    return {
        n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad
    }


class _HashingWriter:
    """A file that hashes what goes through it (torch.save writes to it)."""

    def __init__(self, f):
        self.f, self.h = f, hashlib.sha256()

    def write(self, b) -> int:
        self.h.update(b)
        return self.f.write(b)

    def flush(self) -> None:
        self.f.flush()


def _open_for_write(path: Path):
    return open(path, "wb")


def _write_checkpoint_file(path: Path, write) -> str:
    """Write one file through Python's own file object (a full disk then raises
    OSError(ENOSPC) rather than torch's 'unexpected pos' error), fsync it; its sha256."""
    with _open_for_write(path) as f:
        w = _HashingWriter(f)
        write(w)
        f.flush()
        os.fsync(f.fileno())
    return w.h.hexdigest()


def save_checkpoint(
    work_dir: Path,
    step: int,
    model,
    optimizer,
    scheduler,
    fp: str,
    scaler=None,
    *,
    identity: dict | None = None,
    loss: float | None = None,
) -> Path:
    """Write `checkpoint-<step>` atomically, with the sha256 of each file in its meta.json, then
    keep the two newest checkpoints of this fingerprint (older ones, those of other settings and
    unreadable ones are removed). A full disk raises CheckpointWriteError; the older checkpoints
    are then left as they are."""
    import errno

    from safetensors.torch import save as save_safetensors

    final = work_dir / f"checkpoint-{step:08d}"
    weights = trainable_state(model)
    bad = [n for n, t in weights.items() if t.is_floating_point() and not torch.isfinite(t).all()]
    if bad or (loss is not None and not math.isfinite(loss)):
        what = f"the trainable weight {bad[0]} is" if bad else f"the loss is {loss}"
        raise NonFiniteLossError(
            f"{what} not finite after step {step}: not checkpointed, and stopped. The last good "
            f"checkpoint (if any) is kept in {work_dir}. Lower train.learning_rate or check the "
            "data."
        )
    state = {
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "rng_cpu": torch.get_rng_state(),
        "rng_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        **({"scaler": scaler.state_dict()} if scaler is not None else {}),
    }
    try:
        with atomic_dir(final) as tmp:
            blob = save_safetensors(weights)
            files = {
                "trainable.safetensors": _write_checkpoint_file(
                    tmp / "trainable.safetensors", lambda f: f.write(blob)
                ),
                "state.pt": _write_checkpoint_file(
                    tmp / "state.pt", lambda f: torch.save(state, f)
                ),
            }
            meta = {"step": step, "fingerprint": fp, "files": files, "loss": loss}
            if identity is not None:
                meta["identity"] = identity
            write_json(tmp / "meta.json", meta)
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        kept = [p.name for p in _checkpoints_of(work_dir, fp)]
        why = "no space left on device" if e.errno == errno.ENOSPC else "disk quota exceeded"
        raise CheckpointWriteError(
            f"{why} while writing the checkpoint of step {step} in {work_dir}: "
            + (
                f"the last good checkpoint {kept[-1]} is kept; "
                if kept
                else "no earlier checkpoint to keep; "
            )
            + "free some space and run again to resume"
        ) from None
    keep = _checkpoints_of(work_dir, fp)[-2:]  # the two newest of these settings
    for old in sorted(p for p in work_dir.glob("checkpoint-*") if p not in keep):
        log.info("removed %s (older, or made with other settings, or unreadable)", old.name)
        shutil.rmtree(old, ignore_errors=True)
    return final


def _read_meta(ckpt: Path) -> dict | None:
    try:
        meta = json.loads((ckpt / "meta.json").read_text())
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) else None


def _checkpoints_of(work_dir: Path, fp: str) -> list[Path]:
    """Checkpoints of fingerprint `fp` whose meta.json reads, oldest first."""
    out = []
    for ckpt in sorted(work_dir.glob("checkpoint-*")):
        meta = _read_meta(ckpt)
        if meta is not None and meta.get("fingerprint") == fp:
            out.append(ckpt)
    return out


def read_checkpoint(ckpt: Path) -> tuple[dict, dict, int]:
    """(trainable weights, optimizer/scheduler/RNG state, step) of a checkpoint, verified: every
    file matches the sha256 recorded when it was saved, and loss and weights are finite.
    Raises CheckpointError saying what is wrong (never a loader's advice: state.pt is read with
    weights_only=True only)."""
    from safetensors.torch import load_file

    from .archive import sha256_file

    meta = _read_meta(ckpt)
    if meta is None:
        raise CheckpointError("meta.json is missing or unreadable")
    files = meta.get("files")
    if not isinstance(files, dict):
        raise CheckpointError("meta.json records no file hashes (made by an older vlmflow)")
    for name in CHECKPOINT_FILES:
        path = ckpt / name
        if not path.is_file():
            raise CheckpointError(f"{name} is missing")
        if sha256_file(path) != files.get(name):
            raise CheckpointError(
                f"{name} does not match the sha256 recorded when it was saved (damaged or "
                "truncated)"
            )
    loss = meta.get("loss")
    if loss is not None and not math.isfinite(float(loss)):
        raise CheckpointError(f"its loss is {loss}")
    try:
        weights = load_file(ckpt / "trainable.safetensors")
    except Exception as e:
        raise CheckpointError(
            f"trainable.safetensors cannot be read ({type(e).__name__})"
        ) from None
    for n, t in weights.items():
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise CheckpointError(f"its weight {n} is not finite")
    try:
        state = torch.load(ckpt / "state.pt", weights_only=True)
    except Exception as e:  # its message may suggest weights_only=False: never repeated
        raise CheckpointError(f"state.pt cannot be read ({type(e).__name__})") from None
    return weights, state, int(meta["step"])


def latest_checkpoint(work_dir: Path, fp: str, identity: dict | None = None):
    """The newest checkpoint of fingerprint `fp` that verifies, as (path, weights, state, step),
    or None. Every newer checkpoint passed over is logged with the reason: made with other
    settings (what differs, from `identity`), or damaged (a warning)."""
    for ckpt in sorted(work_dir.glob("checkpoint-*"), reverse=True):
        meta = _read_meta(ckpt)
        if meta is not None and meta.get("fingerprint") != fp:
            why = "; ".join(identity_differences(meta.get("identity"), identity or {}))
            log.warning("%s not resumed: made with other settings: %s", ckpt.name, why)
            continue
        try:
            weights, state, step = read_checkpoint(ckpt)
        except CheckpointError as e:
            log.warning("%s skipped: %s", ckpt.name, e)
            continue
        return ckpt, weights, state, step
    return None


def load_checkpoint(
    ckpt: Path, model, optimizer, scheduler, scaler=None, *, loaded: tuple | None = None
) -> int:
    """Restore a checkpoint (read and verified by read_checkpoint unless `loaded` is given)."""
    weights, state, step = loaded if loaded is not None else read_checkpoint(ckpt)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for n, t in weights.items():
            params[n].copy_(t)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    if scaler is not None and "scaler" in state:
        scaler.load_state_dict(state["scaler"])
    torch.set_rng_state(state["rng_cpu"])
    if state["rng_cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["rng_cuda"])
    return step


def lock_work_dir(work_dir: Path):
    """Take the work folder's exclusive lock (`trainer.lock`, holding this process's PID and
    host) and return its file descriptor; WorkDirBusy names the holder when another trainer has
    it. Where the file system has no locks, a warning and None."""
    import errno
    import fcntl
    import socket

    path = work_dir / "trainer.lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        if e.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
            os.close(fd)
            log.warning(
                "cannot lock %s (%s): nothing keeps a second trainer off this work folder",
                path,
                e.strerror,
            )
            return None
        holder = os.pread(fd, 200, 0).decode(errors="replace").split()
        os.close(fd)
        pid = holder[0] if holder else "?"
        host = f" on {holder[1]}" if len(holder) > 1 else ""
        raise WorkDirBusy(
            f"another trainer (PID {pid}{host}) is using the work folder {work_dir} (it holds "
            f"{path.name}): wait for it to end, or stop it (`kill {pid}`: it checkpoints and "
            "exits) and run again"
        ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()} {socket.gethostname()}\n".encode(), 0)
    return fd


def clean_leftovers(work_dir: Path) -> None:
    """Remove what an interrupted save left behind (`.checkpoint-*.tmp-*` folders of atomic_dir,
    `.*.old-*`, temporary log files). Called under the work folder's lock."""
    for p in sorted(work_dir.glob(".*.tmp-*")) + sorted(work_dir.glob(".*.old-*")):
        log.info("removed %s (left by an interrupted save)", p.name)
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)


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

    loss_fn = model_loss(model)  # label-only cross-entropy, set up once per model
    span = getattr(model, "vlmflow_padded_attention", None)  # fast_paths.padded_attention
    for batch, (index, targets) in zip(micro_batches, positions):  # padded or packed batches
        index, targets = to_device(index), to_device(targets)
        inputs = model_inputs(batch)
        if span is not None:  # checked on the CPU: no synchronisation
            inputs = without_padding_mask(inputs, span)
        batch = {k: to_device(v) for k, v in inputs.items()}
        loss = loss_fn(batch, num_items_in_batch=n_items, positions=(index, targets))
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

    Rank 0 holds the work folder's lock (`lock_work_dir`) for the whole run: a second trainer
    on the same folder stops with WorkDirBusy, naming this one's PID. It then removes what an
    interrupted save left there.
    """
    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    main = dist_ctx is None or dist_ctx.is_main
    lock = lock_work_dir(work_dir) if main else None
    try:
        if main:
            clean_leftovers(work_dir)
        return _train(cfg, train_rows, out_dir, work_dir, data_files, preempt, dist_ctx)
    finally:
        if lock is not None:
            os.close(lock)


def _train(cfg, train_rows, out_dir, work_dir, data_files, preempt, dist_ctx) -> TrainResult:
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
    # rank 0 decides what to resume (identity, hashes) and tells the others the step
    identity, fp, start, loaded = None, None, 0, None
    if ctx.is_main:
        hashes = base_model_hashes(model_cfg, work_dir / "base_model_sha256.json")
        identity = run_identity(cfg, list(data_files), ctx.world_size, hashes)
        fp = fingerprint(identity)
        found = latest_checkpoint(work_dir, fp, identity)
        if found is not None:
            _, *loaded = found
            start = loaded[2]
        elif any(work_dir.glob("checkpoint-*")):
            log.warning("no checkpoint to resume (see above): training starts at step 0")
    start = ctx.sum(start)
    if start:
        ckpt = work_dir / f"checkpoint-{start:08d}"
        load_checkpoint(ckpt, model, optimizer, scheduler, scaler, loaded=loaded)
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
    save_every_s = 60 * train_cfg["save_minutes"]
    last_save = time.monotonic()
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
            ckpt_args = (work_dir, step + 1, model, optimizer, scheduler, fp, scaler)
            ckpt_kw = {"identity": identity, "loss": res.loss}
            due = (
                train_cfg["save_steps"] and (step + 1) % train_cfg["save_steps"] == 0
            ) or (  # time-based: rank 0's clock (it alone writes checkpoints)
                save_every_s > 0 and time.monotonic() - last_save >= save_every_s
            )
            if due and step + 1 < steps:
                if ctx.is_main:
                    save_checkpoint(*ckpt_args, **ckpt_kw)
                    last_save = time.monotonic()
                saved = True
            if step + 1 < steps and ctx.any(preempt is not None and preempt.requested):
                ckpt = work_dir / f"checkpoint-{step + 1:08d}"
                if ctx.is_main and not saved:
                    ckpt = save_checkpoint(*ckpt_args, **ckpt_kw)
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
        TrainSummary(
            steps=steps,
            final_loss=loss_value,
            resumed_from_step=start,
            trainable_parameters=trainable,
            total_parameters=total,
            family=family.name,
            device=str(device),
            world_size=ctx.world_size,
            train_samples=len(data),
        ).write(tmp / "train_summary.json")
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
    """Keep only records of steps ≤ `step` (a resumed run rewrites what came after). A line that
    is not a record (the half-written last line of a killed run) is dropped, with a warning."""
    if not path.exists():
        return
    keep, dropped = [], 0
    for line in path.read_text(errors="replace").splitlines():
        try:
            record = json.loads(line)
            if record["step"] <= step:
                keep.append(line)
        except (ValueError, TypeError, KeyError):
            dropped += line.strip() != ""
    if dropped:
        log.warning("%s: dropped %d unreadable line(s) (a write cut short)", path, dropped)
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
