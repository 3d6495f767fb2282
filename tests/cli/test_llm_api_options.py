"""--extra_llm_api_options FILE.yml (trtllm/cli/llm_api_options.py): TensorRT-LLM's LLM arguments
from a file, applied over the options the flags made (the file wins, a nested config field by
field); anything meaningless here refused by name, naming the file. trtllm-bench and trtllm-eval
end to end: a bad key exits 2 before the engine is built, a good file's values reach LLM."""
import inspect

import pytest

from trtllm.cli.llm_api_options import LlmApiOptionsError, apply_llm_api_options, read_llm_api_options
from trtllm.config import BuildConfig, CapacitySchedulerPolicy, CudaGraphConfig, KvCacheConfig, QuantAlgo
from trtllm.lora_config import LoraConfig
from trtllm.runtime.speculative.config import (
    DraftTargetDecodingConfig,
    EagleDecodingConfig,
    MTPDecodingConfig,
    NGramDecodingConfig,
)

# TensorRT-LLM's typical serving file
TYPICAL = """\
kv_cache_config: {dtype: fp8, free_gpu_memory_fraction: 0.85, enable_block_reuse: true}
cuda_graph_config: {enable_padding: true, max_batch_size: 256}
enable_attention_dp: false
print_iter_log: false
stream_interval: 4
disable_overlap_scheduler: false
enable_chunked_prefill: true
speculative_config: {decoding_type: MTP, num_nextn_predict_layers: 3}
"""


def _file(tmp_path, text: str, name: str = "extra.yml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def _apply(tmp_path, text: str, options: dict | None = None, command: str = "trtllm-serve") -> dict:
    return apply_llm_api_options(dict(options or {}), _file(tmp_path, text), command)


def _refused(tmp_path, text: str, options: dict | None = None, command: str = "trtllm-serve") -> str:
    with pytest.raises(LlmApiOptionsError) as e:
        _apply(tmp_path, text, options, command)
    message = str(e.value)
    assert message.startswith(f"--extra_llm_api_options {tmp_path / 'extra.yml'}: ") and "\n" not in message
    return message.split(": ", 1)[1]


def test_the_typical_file_becomes_the_engines_options(tmp_path):
    flags = dict(build_config=BuildConfig(max_batch_size=8), kv_cache_config=KvCacheConfig(max_tokens=4096),
                 stream_interval=1, speculative_config=None)
    options = _apply(tmp_path, TYPICAL, flags)
    # merged field by field: the flags' max_tokens stays, the file's fields win
    assert options["kv_cache_config"] == KvCacheConfig(max_tokens=4096, dtype="fp8", free_gpu_memory_fraction=0.85,
                                                       enable_block_reuse=True)
    assert options["build_config"] == BuildConfig(max_batch_size=8)
    assert options["cuda_graph_config"] == CudaGraphConfig(enable_padding=True, max_batch_size=256)
    assert options["enable_cuda_graph"] is True
    assert options["speculative_config"] == MTPDecodingConfig(num_nextn_predict_layers=3)
    assert (options["stream_interval"], options["disable_overlap_scheduler"], options["enable_chunked_prefill"]) == \
        (4, False, True)
    # nothing meaningless reaches the engine: its keywords only
    assert not {"enable_attention_dp", "print_iter_log"} & set(options)


def test_every_option_it_makes_is_a_keyword_of_build_engine_and_of_llm(tmp_path):
    from trtllm.runtime.build_engine import build_engine
    from trtllm.runtime.llm import LLM
    text = TYPICAL + ("max_seq_len: 512\nquant_config: {kv_cache_quant_algo: FP8}\ntensor_parallel_size: 1\n"
                      "scheduler_config: {capacity_scheduler_policy: GUARANTEED_NO_EVICT}\ndtype: bfloat16\n"
                      "pipeline_parallel_size: 1\nmoe_expert_parallel_size: null\nskip_tokenizer_init: false\n"
                      "backend: pytorch\ntrust_remote_code: false\nguided_decoding_backend: xgrammar\n")
    options = _apply(tmp_path, text)
    assert set(options) <= set(inspect.signature(build_engine).parameters) - {"limits"}
    assert set(options) <= set(inspect.signature(LLM).parameters)
    assert options["scheduler_config"].capacity_scheduler_policy is CapacitySchedulerPolicy.GUARANTEED_NO_EVICT
    assert options["quant_config"].kv_cache_quant_algo is QuantAlgo.FP8 and options["dtype"] == "bfloat16"


def test_top_level_limits_go_into_the_build_config_over_the_flags(tmp_path):
    flags = dict(build_config=BuildConfig(max_batch_size=8, max_num_tokens=1024))
    options = _apply(tmp_path, "max_batch_size: 16\nmax_seq_len: 512\nbuild_config: {max_input_len: 256}\n", flags)
    assert options["build_config"] == BuildConfig(max_batch_size=16, max_num_tokens=1024, max_seq_len=512,
                                                  max_input_len=256)
    assert "max_batch_size" not in options and "max_seq_len" not in options
    assert _refused(tmp_path, "max_batch_size: 16\nbuild_config: {max_batch_size: 4}\n") == (
        "two values for one limit: max_batch_size=16 and build_config.max_batch_size=4; give it once")
    assert _refused(tmp_path, "max_beam_width: 0\n").startswith("build_config: BuildConfig.max_beam_width=0: must be")


def test_cuda_graph_config_null_turns_graphs_off(tmp_path):
    flags = dict(cuda_graph_config=CudaGraphConfig(max_prefill_tokens=0))  # trtllm-bench's flag made one
    options = _apply(tmp_path, "cuda_graph_config: null\n", flags)
    assert options["enable_cuda_graph"] is False and "cuda_graph_config" not in options
    options = _apply(tmp_path, "enable_cuda_graph: false\n", flags)
    assert options["enable_cuda_graph"] is False and "cuda_graph_config" not in options
    options = _apply(tmp_path, "cuda_graph_config: {batch_sizes: [1, 2]}\n", flags)  # merged over the flag's
    assert options["cuda_graph_config"] == CudaGraphConfig(batch_sizes=[1, 2], max_prefill_tokens=0)
    assert "give one or the other" in _refused(tmp_path, "enable_cuda_graph: false\ncuda_graph_config: {}\n")


@pytest.mark.parametrize("text, config", [
    ("{decoding_type: MTP, num_nextn_predict_layers: 3}", MTPDecodingConfig(num_nextn_predict_layers=3)),
    ("{decoding_type: Eagle, max_draft_len: 3, speculative_model_dir: head}",
     EagleDecodingConfig(max_draft_len=3, speculative_model_dir="head")),
    ("{decoding_type: Eagle3, speculative_model_dir: head}", EagleDecodingConfig(speculative_model_dir="head")),
    ("{decoding_type: NGram, max_draft_len: 2, max_matching_ngram_size: 2}",
     NGramDecodingConfig(max_draft_len=2, max_matching_ngram_size=2)),
    ("{decoding_type: DraftTarget, max_draft_len: 5, speculative_model_dir: draft}",
     DraftTargetDecodingConfig(max_draft_len=5, speculative_model_dir="draft")),
    ("null", None),
])
def test_speculative_config_by_decoding_type(text, config, tmp_path):
    flags = dict(speculative_config=NGramDecodingConfig())  # a flag's: the file's replaces it
    assert _apply(tmp_path, f"speculative_config: {text}\n", flags)["speculative_config"] == config


@pytest.mark.parametrize("text, words", [
    ("{decoding_type: Medusa}", "speculative_config.decoding_type='Medusa': not implemented; one of MTP, Eagle"),
    ("{max_draft_len: 3}", "speculative_config={'max_draft_len': 3}: must be a mapping with decoding_type"),
    ("{decoding_type: NGram, is_keep_all: true}", "speculative_config: NGramDecodingConfig.is_keep_all=True: "
                                                  "keeping every match of a pattern is not implemented"),
    ("{decoding_type: NGram, is_pool: false}", "speculative_config: NGramDecodingConfig.is_pool=False: unknown option"),
    ("{decoding_type: DraftTarget}", "speculative_config: DraftTargetDecodingConfig.speculative_model_dir: required"),
])
def test_a_speculative_config_not_built_here_is_refused_by_name(text, words, tmp_path):
    assert _refused(tmp_path, f"speculative_config: {text}\n").startswith(words)


@pytest.mark.parametrize("text", ["enable_attention_dp: false", "print_iter_log: false", "backend: pytorch",
                                  "trust_remote_code: false", "guided_decoding_backend: xgrammar",
                                  "tokenizer_mode: auto", "load_format: auto", "revision: null",
                                  "enable_iter_perf_stats: false", "enable_lora: false"])
def test_a_meaningless_key_at_the_value_that_changes_nothing_is_taken(text, tmp_path):
    assert _apply(tmp_path, text + "\n", {"dtype": "auto"}) == {"dtype": "auto"}


@pytest.mark.parametrize("text, words", [
    ("enable_attention_dp: true", "enable_attention_dp=True: attention data parallelism is not implemented"),
    ("print_iter_log: true", "print_iter_log=True: no per-iteration log"),
    ("enable_iter_perf_stats: true", "enable_iter_perf_stats=True: these commands read no LLM.get_stats()"),
    ("kv_cache_config: {event_buffer_max_size: 64}", "kv_cache_config.event_buffer_max_size=64: these commands "
                                                     "read no LLM.get_kv_cache_events()"),
    ("backend: tensorrt", "backend='tensorrt': trtllm's one backend is 'pytorch'"),
    ("trust_remote_code: true", "trust_remote_code=True is not supported"),
    ("guided_decoding_backend: llguidance", "guided_decoding_backend='llguidance'"),
    ("enable_attention_dp: 0", "enable_attention_dp=0:"),  # a number is not false
    ("trust_remote_code: 'no'", "trust_remote_code='no': must be true or false"),
    ("stream_interval: 0", "stream_interval=0: must be an integer >= 1"),
    ("tensor_parallel_size: true", "tensor_parallel_size=True: must be an integer >= 1"),
    ("dtype: half", "dtype='half': must be one of auto, float32, float16, bfloat16"),
    ("pp_partition: [2, 0]", "pp_partition=[2, 0]: must be a list of layer counts >= 1"),
    ("enable_chunked_prefill: 'yes'", "enable_chunked_prefill='yes': must be true or false"),
    ("max_batch_sise: 3", "max_batch_sise: unknown key (did you mean 'max_batch_size'?)"),
    ("moe_config: {backend: CUTLASS}\nzzz: 1", "moe_config: unknown key"),
    ("kv_cache_config: {enable_partial_reuse: true}", "kv_cache_config: KvCacheConfig.enable_partial_reuse=True: "
                                                      "unknown option"),
    ("kv_cache_config: {dtype: nvfp4}", "kv_cache_config: KvCacheConfig.dtype='nvfp4': dtype must be one of"),
    ("kv_cache_config: 0.9", "kv_cache_config=0.9: must be a mapping of KvCacheConfig's fields"),
    ("scheduler_config: {capacity_scheduler_policy: STATIC_BATCH}", "scheduler_config: SchedulerConfig"),
    ("skip_tokenizer_init: true", "skip_tokenizer_init=True: trtllm-serve needs the checkpoint's tokenizer"),
    ("enable_lora: true", "enable_lora=True: no adapter is served"),
    ("lora_config: {max_lora_rank: 8}", "lora_config: no adapter is served"),
])
def test_anything_else_is_refused_by_key_value_and_file(text, words, tmp_path):
    assert _refused(tmp_path, text + "\n").startswith(words)


def test_two_unknown_keys_are_both_named(tmp_path):
    assert _refused(tmp_path, "moe_config: {}\nnum_postprocess_workers: 2\n") == (
        "moe_config: unknown key (docs/serve.md lists the keys taken); num_postprocess_workers: unknown key "
        "(docs/serve.md lists the keys taken)")


def test_lora_config_is_merged_over_the_adapters_served(tmp_path):
    served = dict(lora_config=LoraConfig(lora_dir=["a"], max_lora_rank=16, max_cpu_loras=4))
    options = _apply(tmp_path, "enable_lora: true\nlora_config: {max_loras: 2, max_lora_rank: 32}\n", served)
    assert options["lora_config"] == LoraConfig(lora_dir=["a"], max_lora_rank=32, max_loras=2, max_cpu_loras=4)
    assert _refused(tmp_path, "lora_config: {lora_dir: [b]}\n", served).startswith("lora_config.lora_dir: the "
                                                                                   "adapters are --lora_modules'")


def test_skip_tokenizer_init_is_trtllm_benchs_alone(tmp_path):
    assert _apply(tmp_path, "skip_tokenizer_init: true\n", command="trtllm-bench")["skip_tokenizer_init"] is True
    assert "trtllm-eval needs" in _refused(tmp_path, "skip_tokenizer_init: true\n", command="trtllm-eval")


@pytest.mark.parametrize("text, words", [
    ("max_batch_size: [1\n", "not valid YAML (line 2, column 1): expected ',' or ']'"),
    ("- max_batch_size: 1\n", "must be a mapping of LLM arguments (key: value), got a list"),
    ("1: 2\n", "key 1: must be a string"),
    ("stream_interval: 2\nstream_interval: 4\n", "key 'stream_interval' given twice (line 2)"),
    ("kv_cache_config: {dtype: fp8, dtype: auto}\n", "key 'dtype' given twice (line 1)"),
    ("kv_cache_config: {1: 2}\n", "kv_cache_config: key 1 must be a string"),
    ("a: !!python/object/apply:os.system [ls]\n", "not valid YAML (line 1, column 4): could not determine a "
                                                   "constructor"),
])
def test_a_bad_file_is_named_with_why(text, words, tmp_path):
    assert _refused(tmp_path, text).startswith(words)


def _laughs(levels: int = 9) -> str:
    """Nine anchors, each a list of nine aliases of the one before: 9**9 strings once expanded."""
    lines = ["  - &l0 [x, x, x, x, x, x, x, x, x]"]
    lines += [f"  - &l{i} [{', '.join([f'*l{i - 1}'] * 9)}]" for i in range(1, levels)]
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize("text, words", [
    ("pp_partition:\n" + _laughs(), "holds more than 10000 values once its aliases are expanded"),
    ("kv_cache_config:\n  dtype:\n" + _laughs().replace("  - ", "    - "), "holds more than 10000 values"),
    ("stream_interval: " + "[" * 5000 + "]" * 5000 + "\n", "nested too deeply"),
], ids=["laughs", "nested-laughs", "deep"])
def test_a_file_too_big_once_read_is_refused_at_once(text, words, tmp_path):
    assert words in _refused(tmp_path, text)  # (was a 2 GB message after a minute, or a RecursionError)


def test_a_huge_file_is_refused_unread(tmp_path):
    text = "dtype: " + "x" * 50_000_000 + "\n"  # (PyYAML took minutes over it, then named it in a 50 MB message)
    assert _refused(tmp_path, text) == "over 1 MiB: not an options file (LLM's arguments are a handful)"


@pytest.mark.timeout(15)  # (26 s on the dev CPU before, 3 s now)
def test_a_file_of_many_keys_is_read_in_time(tmp_path):
    # the check for a key given twice compared each with every one before: minutes for 100,000 keys (under 1 MiB)
    text = "".join(f"k{i}: 1\n" for i in range(30_000))
    assert _refused(tmp_path, text + "k5: 2\n") == "key 'k5' given twice (line 30001)"
    assert _refused(tmp_path, text).startswith("holds more than 10000 values")


def test_a_missing_file_is_named(tmp_path):
    with pytest.raises(LlmApiOptionsError, match=f"^--extra_llm_api_options {tmp_path / 'no.yml'}: no such file$"):
        read_llm_api_options(tmp_path / "no.yml")


def test_json_and_an_empty_file_are_read(tmp_path):
    assert read_llm_api_options(_file(tmp_path, '{"max_batch_size": 4, "kv_cache_config": {"dtype": "fp8"}}',
                                      "extra.json")) == {"max_batch_size": 4, "kv_cache_config": {"dtype": "fp8"}}
    assert read_llm_api_options(_file(tmp_path, "# nothing\n")) == {}
    assert apply_llm_api_options({"dtype": "auto"}, None, "trtllm-serve") == {"dtype": "auto"}


# trtllm-bench and trtllm-eval, end to end: LLM replaced by one that records what it was given
class _Built(Exception):
    pass


@pytest.fixture
def llm_kwargs(monkeypatch):
    import trtllm.runtime.llm as llm_module
    seen = []

    def fake_llm(*args, **kwargs):
        seen.append(kwargs)
        raise _Built
    monkeypatch.setattr(llm_module, "LLM", fake_llm)
    return seen


FLAT = ["--batch_size", "2", "--input_len", "8", "--output_len", "4", "--kv_cache_max_tokens", "512"]


def test_bench_a_good_files_values_reach_llm(tmp_path, llm_kwargs):
    from trtllm.cli.bench import main
    extra = _file(tmp_path, TYPICAL.replace("MTP, num_nextn_predict_layers: 3", "NGram, max_draft_len: 3")
                  + "dtype: float32\nmax_num_tokens: 256\n")
    with pytest.raises(_Built):
        main([*FLAT, "--extra-llm-api-options", str(extra)])
    (kwargs,) = llm_kwargs
    assert kwargs["kv_cache_config"] == KvCacheConfig(max_tokens=512, dtype="fp8", free_gpu_memory_fraction=0.85,
                                                      enable_block_reuse=True)
    assert kwargs["build_config"].max_num_tokens == 256 and kwargs["build_config"].max_batch_size == 2
    assert kwargs["speculative_config"] == NGramDecodingConfig(max_draft_len=3)
    assert kwargs["dtype"] == "float32" and kwargs["stream_interval"] == 4


@pytest.mark.parametrize("argv", [FLAT, ["throughput", "--dataset", "d.jsonl"]])
def test_bench_a_bad_key_exits_2_before_the_engine_is_built(argv, tmp_path, llm_kwargs, capsys):
    from trtllm.cli.bench import main
    if argv[0] == "throughput":
        (tmp_path / "d.jsonl").write_text('{"task_id": 0, "input_ids": [1, 2, 3], "output_tokens": 2}\n')
        argv = ["throughput", "--dataset", str(tmp_path / "d.jsonl")]
    extra = _file(tmp_path, "enable_attention_dp: true\n")
    assert main([*argv, "--extra_llm_api_options", str(extra)]) == 2
    assert capsys.readouterr().err.splitlines() == [
        f"trtllm-bench: bad option: --extra_llm_api_options {extra}: enable_attention_dp=True: attention data "
        "parallelism is not implemented (tensor parallelism splits every sequence's attention over the ranks); "
        "only false is taken"]
    assert llm_kwargs == []


def test_bench_prepare_dataset_refuses_it(tmp_path, capsys):
    from trtllm.cli.bench import main
    assert main(["--extra_llm_api_options", "x.yml", "prepare-dataset", "--num_requests", "1", "--input_mean", "4",
                 "--output_mean", "4"]) == 2
    assert "--extra_llm_api_options: not an option of prepare-dataset" in capsys.readouterr().err


def test_eval_a_good_files_values_reach_llm_and_a_bad_key_exits_2(tmp_path, llm_kwargs, capsys):
    from trtllm.cli.eval import main
    good = _file(tmp_path, "kv_cache_config: {dtype: int8}\nmax_num_tokens: 512\ncuda_graph_config: null\n")
    with pytest.raises(_Built):
        main(["--model", "demo", "--kv_cache_free_gpu_memory_fraction", "0.5", "perplexity",
              "--extra_llm_api_options", str(good)])
    (kwargs,) = llm_kwargs
    assert kwargs["kv_cache_config"] == KvCacheConfig(free_gpu_memory_fraction=0.5, dtype="int8")
    assert kwargs["build_config"].max_num_tokens == 512 and kwargs["build_config"].max_batch_size == 64
    assert kwargs["enable_cuda_graph"] is False and "cuda_graph_config" not in kwargs
    bad = _file(tmp_path, "lora_config: {max_lora_rank: 8}\n", "bad.yml")
    assert main(["--model", "demo", "--extra-llm-api-options", str(bad), "perplexity"]) == 2
    assert capsys.readouterr().err.splitlines() == [
        f"trtllm-eval: --extra_llm_api_options {bad}: lora_config: no adapter is served (trtllm-serve "
        "--lora_modules NAME=PATH names each; trtllm-bench and trtllm-eval run none)"]
    assert len(llm_kwargs) == 1
