"""Tensor (and expert, vocabulary) parallelism on torch.distributed (gloo on CPU, NCCL on CUDA), one file a concern:

- tensor_parallel.py: what a rank is (`TensorParallel`: rank, size, process group, where its
  weight slices come from) and the size rules (heads, KV heads, features per rank);
- expert_parallel.py: how the MoE layers split the ranks (experts, each expert's width), with
  TensorRT-LLM's sizes; the vocabulary's size rule;
- process_group.py: starting and ending the process group (environment, timeouts);
- checkpoint_slices.py: a rank's weight slices read from the safetensors files;
- expert_checkpoint.py: an HF mixture-of-experts model for one rank, its experts read from the
  per-expert checkpoint tensors;
- worker.py: a rank > 0 process: loads its slices, compiles, runs each step rank 0 sends;
- workers.py: rank 0's side: starting the workers (spawn), sending them each step, noticing
  a dead one, shutting them down.

The sharding itself is compile passes: passes/shard_tensor_parallel.py, shard_experts.py,
shard_vocab_parallel.py.
"""
