"""What an engine tells an observer: one StepRecord per Engine.step (Engine.on_step), and
where building it took time (Engine.startup, CompiledModel.compile_s)."""
import torch

from tests.models.checkpoints import write_checkpoint
from tests.runtime.tokenizers import make_tokenizer
from trtllm.config import BuildConfig
from trtllm.runtime import build_engine
from trtllm.runtime.engine_stats import StepRecord
from trtllm.runtime.llm import LLM
from trtllm.sampling_params import SamplingParams


def test_step_records_and_startup_times(tmp_path, monkeypatch):
    checkpoint = write_checkpoint("llama31", tmp_path, vocab_size=512)
    make_tokenizer(checkpoint)
    logged: list[str] = []  # what build_engine logs at INFO (whatever other tests did to logging)
    monkeypatch.setattr(build_engine.log, "info", lambda msg, *args: logged.append(msg % args if args else msg))
    llm = LLM(checkpoint, build_config=BuildConfig(max_batch_size=2, max_seq_len=64))
    on_gpu = torch.device(llm.engine.runner.device).type == "cuda"
    with llm:
        startup = llm.engine.startup
        # CUDA graphs on a GPU only (this ran on CPU alone, and failed on an H100 by its capture time)
        assert startup.load_s > 0 and (startup.cuda_graph_capture_s > 0) == on_gpu
        assert startup.total_s >= startup.load_s + startup.compile_s
        # the one-line breakdown at INFO (issue 19); a CPU engine compiles lazily, at its first steps
        assert startup.line() in logged
        assert on_gpu or "0 capture(s) of the model, 0 graph(s)" in startup.line()
        compiled_at_startup = llm.compiled.compile_s
        records: list[StepRecord] = []
        llm.engine.on_step = records.append
        prompts = [[5, 17, 99, 3], [400, 2], [9, 8, 7]]
        params = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
        outs = llm.generate(prompts, params, use_tqdm=False)
        llm.engine.on_step = None
    assert all(len(o.outputs[0].token_ids) == 4 for o in outs)
    assert on_gpu or llm.compiled.compile_s > compiled_at_startup  # compiled lazily, at the first steps, on CPU
    # every prompt token and every output token but the last is computed once
    assert sum(r.num_tokens for r in records) == sum(len(p) for p in prompts) + 3 * (4 - 1)
    assert max(r.stats.num_running for r in records) == 2  # max_batch_size
    assert records[0].stats.num_waiting == 1 and records[-1].stats.num_running == 0
    assert all(r.duration_s >= 0 for r in records)
    assert [r.start_s for r in records] == sorted(r.start_s for r in records)
