"""FSDP2 for train.py and reference_lm.py --fsdp under torchrun: weights, gradients and AdamW moments sharded over
the processes (utils.wrap calls `shard`), and full state gathered for checkpoints, which therefore load anywhere.
Registered as the plug-ins "fsdp", "fsdp_full_state", "fsdp_full_weights" and "fsdp_load_optimizer" (docs/scale.md).

    torchrun --standalone --nproc_per_node=8 -m scale train --fsdp ...
"""
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_optimizer_state_dict,
                                                     set_optimizer_state_dict)

from utils import make_optimizer, register

GATHER = StateDictOptions(full_state_dict=True, cpu_offload=True)  # full tensors onto rank 0's CPU


@register("fsdp")
def shard(model, opt, cfg, device):
    """FSDP2: fully_shard each decoder block, then the root (encoder, projector, embeddings, final norm: one
    unit). Each process keeps 1/world of every weight, gradient and optimizer moment; a block's full weights
    are gathered just for its forward and backward. Weights stay fp32 in the all-gathers (no
    MixedPrecisionPolicy): under autocast the matmuls run in bf16 anyway, while norms, embeddings and the
    residual stream keep fp32. fully_shard swaps the parameters for sharded ones, so the optimizer is made
    again over them, carrying over the state `opt` holds when resuming (by parameter name)."""
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


@register("fsdp_full_state")
def full_state(model, opt):
    """A collective every rank joins: rank 0 gets the full weights and the optimizer state keyed by parameter name
    (which --resume reads with or without --fsdp), the others empty dicts."""
    return get_model_state_dict(model, options=GATHER), get_optimizer_state_dict(model, opt, options=GATHER)


@register("fsdp_full_weights")
def full_weights(model):
    return get_model_state_dict(model, options=GATHER)


@register("fsdp_load_optimizer")
def load_optimizer(model, opt, state):
    """An --fsdp run's optimizer state (keyed by parameter name) into `opt`, sharded or not."""
    set_optimizer_state_dict(model, opt, state, options=StateDictOptions(full_state_dict=True))
