"""Several processes (torchrun): set-up, DDP or FSDP2 wrapping, and unsharded state for checkpoints.

One process needs none of it: setup_distributed returns rank 0 of 1 and train.py (and reference_lm.py) trains the
bare model. wrap and shard take a VLM (its .decoder's blocks are the sharding units) or a bare Decoder (its blocks).
"""
import os
import time

import torch
import torch.distributed as dist

from lib.utils import make_optimizer


def check_bf16(device):
    """Training on a GPU runs under bf16 autocast (utils.autocast); refuse GPUs without bf16 (V100, T4), whose
    fp16 would need a GradScaler this project does not have."""
    if str(device).startswith("cuda") and not torch.cuda.is_bf16_supported(including_emulation=False):
        raise ValueError(f"{torch.cuda.get_device_name(device)} has no bf16, which training on a GPU needs (fp16 "
                         f"with loss scaling is not implemented): use --device cpu or a GPU with bf16 (A100 or newer)")


def setup_distributed(device, bf16=True):
    """(rank, world size, this process's device) under torchrun, or (0, 1, device) alone; GPUs must have bf16
    (bf16=False: a float32 job, score.py's)."""
    if bf16:
        check_bf16(device)
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return 0, 1, device
    if device.startswith("cuda"):  # bind the process to its GPU before NCCL starts, and tell NCCL which one
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=torch.device(device))
    else:
        dist.init_process_group("gloo")
    return dist.get_rank(), dist.get_world_size(), device


def unwrap(module):
    """The bare model inside DDP (.module) and torch.compile (._orig_mod) wrappers."""
    while hasattr(module, "module") or hasattr(module, "_orig_mod"):
        module = getattr(module, "module", None) or module._orig_mod
    return module


def shard(model, opt, cfg, device):
    """FSDP2: fully_shard each decoder block, then the root (encoder, projector, embeddings, final norm: one
    unit). Each process keeps 1/world of every weight, gradient and optimizer moment; a block's full weights
    are gathered just for its forward and backward. Weights stay fp32 in the all-gathers (no
    MixedPrecisionPolicy): under autocast the matmuls run in bf16 anyway, while norms, embeddings and the
    residual stream keep fp32. fully_shard swaps the parameters for sharded ones, so the optimizer is made
    again over them, carrying over the state `opt` holds when resuming (by parameter name)."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_optimizer_state_dict,
                                                         set_optimizer_state_dict)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    full = StateDictOptions(full_state_dict=True)
    state = get_optimizer_state_dict(model, opt, options=full) if opt.state else None
    # An explicit mesh: fully_shard's default is a CUDA mesh whenever CUDA exists, even for --device cpu.
    mesh = init_device_mesh("cuda" if device.startswith("cuda") else "cpu", (dist.get_world_size(),))
    for block in getattr(model, "decoder", model).blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    opt = make_optimizer(model.parameters(), cfg.lr, cfg.weight_decay)
    if state is not None:
        set_optimizer_state_dict(model, opt, state, options=full)
    return opt


def full_state(model, opt, sharded):
    """Weights and optimizer state as one unsharded process holds them. Sharded (FSDP): a collective that every
    rank must join, gathering full tensors onto rank 0's CPU (the others get empty dicts), so a checkpoint
    of a sharded run loads anywhere (load_model, eval.py, a run without --fsdp); the optimizer state is then
    keyed by parameter name, which --resume reads with or without --fsdp."""
    if not sharded:
        return model.state_dict(), opt.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict
    gather = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(model, options=gather), get_optimizer_state_dict(model, opt, options=gather)


def wait_until(ready, poll=1.0):
    """Poll ready() until it holds: for files another rank writes (not a barrier: decoding a large image set can
    outlast a collective's timeout; if that rank fails, torchrun stops the others)."""
    while not ready():
        time.sleep(poll)


def wrap(model, opt, cfg, world, device, master):
    """(train_model, opt): the model as the step runs it: sharded in place (--fsdp), inside DDP, compiled."""
    train_model = model
    if cfg.fsdp and world == 1 and master:
        print("--fsdp: one process, nothing to shard; training unsharded")
    if cfg.fsdp and world > 1:
        opt = shard(model, opt, cfg, device)
    elif world > 1:
        train_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device] if device.startswith("cuda") else None)
    if getattr(cfg, "compile", False):
        train_model = torch.compile(train_model, dynamic=True)  # batch shapes change every step (tight packing)
    return train_model, opt


def reduce_stats(stats, nll_by_tag, world, device):
    """Sum every figure over the processes, so the log covers the global batch."""
    if world > 1:
        keys = ("loss", "ntp", "aux", "tokens", "positions", "padding", "images", "context", "attended")
        packed = torch.tensor([stats[k] for k in keys], dtype=torch.float64, device=device)  # NCCL: GPU only
        dist.all_reduce(packed)
        stats.update(zip(keys, packed.tolist()))
        dist.all_reduce(nll_by_tag)
    return stats, nll_by_tag.cpu()


def global_mean(x, world):
    """The mean of a scalar tensor over the processes (a detached copy; x itself when alone): for logs."""
    if world == 1:
        return x.detach()
    x = x.detach().clone()
    dist.all_reduce(x)
    return x / world


def full_weights(model, sharded):
    """The model's weights as CPU copies that outlive training: gathered onto rank 0 when sharded (a collective
    every rank joins; the others get {}), else a clone of the state dict."""
    if sharded:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
