"""Tensor, pipeline and expert (and vocabulary) parallelism on torch.distributed (gloo on CPU, NCCL on
CUDA), one file a concern:

- tensor_parallel.py: what a rank is (`TensorParallel`: rank, size, process group, where its
  weight slices come from) and the size rules (heads, KV heads, features per rank);
- expert_parallel.py: how the MoE layers split the ranks (experts, each expert's width), with
  TensorRT-LLM's sizes; the vocabulary's size rule;
- pipeline_parallel.py: a rank's stage (`PipelineStage`), the layer partition, and the
  `trtllm.stage_input` op through which a stage reads what the stage before sent;
- process_group.py: starting and ending the process groups (environment, timeouts);
- step_channel.py: rank 0 hands each model call to the others (a broadcast, across nodes too);
- checkpoint_slices.py: a rank's weight slices read from the safetensors files;
- expert_checkpoint.py: an HF mixture-of-experts model for one rank, its experts read from the
  per-expert checkpoint tensors;
- rank_model.py: what every rank does alike: its place, its stage's weights, its compilation;
- worker.py: a rank > 0 process (spawned, or started by torchrun): loads its stage and slices,
  compiles, runs each step rank 0 sends, passes hidden states on, sends the logits back;
- workers.py: rank 0's side: refusing bad sizes, starting the workers (spawn) or joining
  torchrun's, sending them each step, noticing a dead one, shutting them down.

Sharding and stage cutting are compile passes: passes/shard_tensor_parallel.py, shard_experts.py,
shard_vocab_parallel.py, split_pipeline_stage.py.
"""
