"""The global batch over N ranks for the planner: which strategies to try, and how the plan reads.

Each rank gets its share of the global batch (the first ranks one sample more where it does not
divide, as :func:`memfit.config.rank_micro_batches` and the Trainer run it); every rank runs the
same micro-steps, so the plan is sized for the largest share.
"""

from __future__ import annotations

from typing import Any

from memfit.config import Config, check_strategy, check_world_size
from memfit.errors import UsageError

__all__ = ["strategy_variants", "ranks_reason"]


def strategy_variants(world_size: int, strategies, batch_size: int) -> list[dict[str, Any]]:
    """The Config fields of each strategy the plan may use over ``world_size`` ranks, least memory last."""
    check_world_size(world_size)
    if isinstance(strategies, str):
        strategies = (strategies,)
    if world_size == 1:
        strategies = tuple(strategies) if strategies else ("single",)
    else:
        strategies = tuple(strategies) if strategies else ("ddp", "fsdp")
        if "single" in strategies:
            raise UsageError(f"strategy 'single' runs one process, and world_size is {world_size}; "
                             "give strategies among 'ddp' and 'fsdp'")
        if batch_size < world_size:
            raise UsageError(f"a global batch of {batch_size} cannot give each of {world_size} ranks a sample; "
                             f"give a batch of at least {world_size}, or fewer GPUs")
    variants = []
    for name in dict.fromkeys(strategies):
        check_strategy(name, "a strategy")
        variants += [{"strategy": name}] if name != "fsdp" else [
            {"strategy": name, "reshard_after_forward": reshard, "sync_every_micro_step": sync}
            for reshard in (False, True) for sync in (False, True)]
    return variants


def ranks_reason(config: Config, batch_size: int, world_size: int, variants) -> str:
    base, extra = divmod(batch_size, world_size)
    shares = (f"{base} samples each" if not extra else
              f"{base + 1} samples on ranks 0-{extra - 1} and {base} on the others (every rank runs the same "
              "micro-steps; the figures are the larger share's)")
    how = {"ddp": "DDP (each rank holds the whole model; gradients all-reduced once per step)",
           "fsdp": "FSDP2 (parameters, gradients and optimizer state sharded over the ranks"
                   + ("; blocks regathered for backward" if config.reshard_after_forward
                      else "; blocks kept gathered from forward to backward")
                   + ("; gradients reduce-scattered every micro-step, only shards kept)"
                      if config.sync_every_micro_step else ")")}[config.strategy]
    chosen = f"{how}" + ("" if len(variants) == 1 else " predicted fastest of the strategies allowed that fit")
    return f"the global batch of {batch_size} over {world_size} ranks: {shares}; {chosen}"
