"""Collective schedules of compiled graphs (schedule.py) and their executor on torch.distributed.

    schedule.py   the schedule IR: per MoE layer, the collectives (kind, group, split source,
                  buffer shapes, the compute each may overlap), dumped as JSON with the pass dumps
    executor.py   runs the collectives on torch.distributed (gloo on CPU, NCCL on GPU): counts
                  exchange, all_to_all_single with data-dependent splits (differentiable: the
                  backward is the reverse all-to-all), hierarchical (intra-node, then inter-node)
    ep.py         the expert-parallel MoE layer op ``moe_compiler::ep_moe`` built on the executor
    fssdp.py      Hecate's FSSDP: ``sparse_all_gather`` / ``sparse_reduce_scatter`` (autograd-paired
                  torch.library ops) and the ``fssdp_moe`` layer op (experts move to the tokens)
    coherent.py   ExFlow's context-coherent executor (one all-to-all per layer), standalone
"""
