"""trtllm-serve's command line: bad options fail before any model loads, one line per
problem; a port in use fails at once, before the model loads, and never says "serving"."""
import os
import socket
import subprocess
import sys

import pytest

import trtllm.cli.serve as cli
from tests.serve.server import REPO_ROOT
from trtllm.cli.serve import main


def test_bad_engine_options_are_named_one_line_each(capsys):
    assert main(["--port", "0", "--max_batch_size", "-1", "--kv_cache_free_gpu_memory_fraction", "nan"]) == 2
    err = capsys.readouterr().err
    assert err.splitlines() == ["trtllm-serve: bad option:",
                                "BuildConfig.max_batch_size=-1: must be greater than 0"], err
    assert main(["--port", "0", "--kv_cache_free_gpu_memory_fraction", "nan"]) == 2
    err = capsys.readouterr().err
    assert "KvCacheConfig.free_gpu_memory_fraction=nan: must be a finite number" in err
    assert "pydantic" not in err and "Traceback" not in err


def test_speculative_options_become_the_engines_config():
    from trtllm.runtime.speculative.config import DraftTargetDecodingConfig, NGramDecodingConfig
    options = cli.engine_options(cli.parse_args(["m", "--speculative", "ngram", "--max_draft_len", "3"]))
    assert options["speculative_config"] == NGramDecodingConfig(max_draft_len=3, max_matching_ngram_size=3)
    options = cli.engine_options(cli.parse_args(["m", "--speculative", "draft_target", "--speculative_model_dir", "d"]))
    assert options["speculative_config"] == DraftTargetDecodingConfig(max_draft_len=4, speculative_model_dir="d")
    assert cli.engine_options(cli.parse_args(["m"]))["speculative_config"] is None


def test_a_draft_target_without_its_model_is_a_bad_option(capsys):
    assert main(["--port", "0", "--speculative", "draft_target"]) == 2
    assert capsys.readouterr().err.splitlines() == [
        "trtllm-serve: bad option:", "--speculative: draft_target needs --speculative_model_dir (the draft's checkpoint)"]


@pytest.mark.parametrize("argv, words", [
    (["--port", "70000"], "--port 70000: must be in [0, 65535]"),
    (["--port", "-1"], "--port -1: must be in [0, 65535]"),
    (["--max-concurrent-requests", "0"], "--max-concurrent-requests 0: must be at least 1"),
    (["--shutdown-timeout", "nan"], "--shutdown-timeout nan: must be a finite number of seconds >= 0"),
    (["--shutdown-timeout", "-2"], "--shutdown-timeout -2.0: must be a finite"),
    (["--max_loras", "2", "--max_cpu_loras", "8"], "--max_loras, --max_cpu_loras: LoRA options, and no --lora_modules"),
    (["--pp_partition", "2"], "--pp_partition: is for --pp_size > 1 (layers per pipeline stage); --pp_size is 1"),
    # these were the engine's errors under LLM's names, once the port was bound and the engine process started
    (["--tp_size", "0"], "--tp_size 0: must be at least 1"),
    (["--ep_size", "2"], "--ep_size 2: must divide --tp_size 1"),
    (["--pp_size", "2", "--pp_partition", "1", "1", "2"], "--pp_partition 1 1 2: must be 2 layer counts (one a stage "
                                                           "of --pp_size 2), each at least 1"),
    (["--pp_size", "2", "--pp_partition", "3", "0"], "--pp_partition 3 0: must be 2 layer counts"),
])
def test_server_options_out_of_range_are_refused_before_binding(argv, words, monkeypatch, capsys):
    def bind(*_):
        raise AssertionError("the port was bound for options that cannot serve")
    monkeypatch.setattr(cli, "bind_socket", bind)
    assert main(["--port", "0", *argv]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and err.startswith(f"trtllm-serve: bad option: {words}"), err


def test_max_cpu_loras_0_is_refused_not_the_default(tmp_path):
    from trtllm.config import ConfigError
    args = cli.parse_args(["m", "--lora_modules", f"a={tmp_path}", "--max_cpu_loras", "0"])
    with pytest.raises(ConfigError, match="max_cpu_loras=0: must be greater than 0"):
        cli.engine_options(args)


@pytest.mark.parametrize("argv, why", [([], "; no --speculative given"), (["--speculative", "ngram"], ", not ngram")])
def test_a_speculative_model_dir_nothing_reads_is_a_bad_option(argv, why, monkeypatch, capsys):
    assert _refused_before_loading([*argv, "--speculative_model_dir", "draft"], monkeypatch, capsys) == [
        "trtllm-serve: bad option:", f"--speculative_model_dir: is for --speculative draft_target, eagle3 or mtp{why}"]


def _refused_before_loading(argv, monkeypatch, capsys) -> list[str]:
    """main(argv) exits 2 before the model loads: its stderr lines."""
    def load(*_):
        raise AssertionError("the model loaded with an option it never reads")
    monkeypatch.setattr(cli, "build_llm", load)
    assert main(["--port", "0", *argv]) == 2
    return capsys.readouterr().err.splitlines()


@pytest.mark.parametrize("argv, words", [  # defaults of 4 and 3: given alone, they were silently unused
    (["--max_draft_len", "3"], "--max_draft_len: is for --speculative ngram, draft_target, eagle3 or mtp; "
                               "no --speculative given"),
    (["--speculative", "mtp", "--max_matching_ngram_size", "2"], "--max_matching_ngram_size: is for --speculative "
                                                                 "ngram, not mtp"),
])
def test_a_speculative_option_nothing_reads_is_a_bad_option(argv, words, monkeypatch, capsys):
    assert _refused_before_loading(argv, monkeypatch, capsys) == ["trtllm-serve: bad option:", words]


@pytest.mark.parametrize("argv, words", [  # the caps' defaults hid them: given for a text model, silently unused
    (["--max_image_pixels", "100"], "--max_image_pixels: an image option, and the demo model takes no images "
                                    "(LlamaForCausalLM: a text-only model)"),
    (["--allowed_local_media_path", "/tmp", "--max_images_per_request", "2"],
     "--allowed_local_media_path, --max_images_per_request: image options, and the demo model takes no images"),
])
def test_image_options_for_a_text_only_model_are_a_bad_option(argv, words, monkeypatch, capsys):
    err = _refused_before_loading(argv, monkeypatch, capsys)
    assert len(err) == 1 and err[0].startswith(f"trtllm-serve: bad option: {words}"), err


@pytest.mark.parametrize("argv, words", [(["--max_images_per_request", "-1"], "--max_images_per_request -1: must "
                                                                              "be at least 0"),
                                         (["--max_image_pixels", "0"], "--max_image_pixels 0: must be at least 1")])
def test_an_image_cap_out_of_range_is_named_by_its_flag(argv, words, tmp_path, monkeypatch, capsys):
    """Not by MediaPolicy's fields (max_images / max_pixels), and before the port is bound."""
    def bind(*_):
        raise AssertionError("the port was bound for an image cap out of range")
    monkeypatch.setattr(cli, "bind_socket", bind)
    (tmp_path / "config.json").write_text('{"architectures": ["LlavaForConditionalGeneration"]}')
    assert main([str(tmp_path), "--port", "0", *argv]) == 2
    assert capsys.readouterr().err.splitlines() == [f"trtllm-serve: bad option: {words}"]


def test_image_options_for_a_multimodal_checkpoint_become_its_media_policy(tmp_path):
    from trtllm.cli.serve_options import media_policy
    from trtllm.runtime.multimodal_inputs import MAX_IMAGE_PIXELS, MAX_IMAGES_PER_REQUEST
    (tmp_path / "config.json").write_text('{"architectures": ["LlavaForConditionalGeneration"]}')
    policy = media_policy(cli.parse_args([str(tmp_path), "--max_images_per_request", "2"]))
    assert (policy.allowed_local_media_path, policy.max_images, policy.max_pixels) == (None, 2, MAX_IMAGE_PIXELS)
    policy = media_policy(cli.parse_args([]))  # none given: the defaults, for the text-only demo model too
    assert (policy.max_images, policy.max_pixels) == (MAX_IMAGES_PER_REQUEST, MAX_IMAGE_PIXELS)


@pytest.fixture
def taken_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield s.getsockname()[1]


def test_port_in_use_fails_before_the_model_loads(taken_port, model_dir, monkeypatch, capsys):
    def load(*_):
        raise AssertionError("the model loaded before the port was checked")

    monkeypatch.setattr(cli, "build_llm", load)
    assert main([str(model_dir), "--port", str(taken_port)]) == 2
    err = capsys.readouterr().err
    assert err.splitlines() == [f"trtllm-serve: cannot listen on 127.0.0.1:{taken_port}: Address already in use "
                                "(another server on this port? choose one with --port)"], err


@pytest.mark.timeout(300)
def test_port_in_use_exits_nonzero_without_loading(taken_port, model_dir):
    done = subprocess.run([sys.executable, "-m", "trtllm.cli.serve", str(model_dir), "--port", str(taken_port)],
                          cwd=REPO_ROOT, env=dict(os.environ, PYTHONPATH=str(REPO_ROOT)), capture_output=True,
                          text=True, timeout=240)
    assert done.returncode == 2, done.stderr
    assert f"cannot listen on 127.0.0.1:{taken_port}: Address already in use" in done.stderr
    output = done.stdout + done.stderr
    assert "loaded" not in output and "serving" not in output and "Traceback" not in output, output


def test_extra_llm_api_options_a_bad_key_is_refused_before_loading(tmp_path, monkeypatch, capsys):
    extra = tmp_path / "extra.yml"
    extra.write_text("print_iter_log: false\nenable_attention_dp: true\n")
    assert _refused_before_loading(["--extra_llm_api_options", str(extra)], monkeypatch, capsys) == [
        f"trtllm-serve: bad option: --extra_llm_api_options {extra}: enable_attention_dp=True: attention data "
        "parallelism is not implemented (tensor parallelism splits every sequence's attention over the ranks); "
        "only false is taken"]


def test_extra_llm_api_options_reach_the_engine_over_the_flags(tmp_path, monkeypatch, capsys):
    from trtllm.config import KvCacheConfig
    from trtllm.runtime.speculative.config import MTPDecodingConfig
    extra = tmp_path / "extra.yml"
    extra.write_text("kv_cache_config: {dtype: fp8, free_gpu_memory_fraction: 0.85}\nstream_interval: 4\n"
                     "cuda_graph_config: null\nmax_batch_size: 16\n"
                     "speculative_config: {decoding_type: MTP, num_nextn_predict_layers: 3}\n")
    built = []

    def load(args, options):
        built.append(options)
        raise ValueError("not loaded (test)")
    monkeypatch.setattr(cli, "build_llm", load)
    assert main(["--port", "0", "--max_batch_size", "8", "--kv_cache_max_tokens", "4096", "--stream_interval", "2",
                 "--extra-llm-api-options", str(extra)]) == 2
    assert capsys.readouterr().err.splitlines() == ["trtllm-serve: cannot load the model: not loaded (test)"]
    (options,) = built  # the file wins; the flags' other fields stay
    assert options["kv_cache_config"] == KvCacheConfig(max_tokens=4096, dtype="fp8", free_gpu_memory_fraction=0.85)
    assert (options["build_config"].max_batch_size, options["stream_interval"]) == (16, 4)
    assert options["enable_cuda_graph"] is False and "cuda_graph_config" not in options
    assert options["speculative_config"] == MTPDecodingConfig(num_nextn_predict_layers=3)


def test_extra_llm_api_options_lora_config_over_the_served_adapters(tmp_path):
    extra = tmp_path / "extra.yml"
    extra.write_text("enable_lora: true\nlora_config: {max_loras: 2, max_lora_rank: 32}\n")
    options = cli.engine_options(cli.parse_args(["m", "--lora_modules", f"a={tmp_path}", "--max_lora_rank", "8",
                                                 "--extra_llm_api_options", str(extra)]))
    config = options["lora_config"]
    assert (config.lora_dir, config.max_loras, config.max_lora_rank) == ([str(tmp_path)], 2, 32)


def test_a_chats_default_max_tokens_fits_an_engine_without_chunked_prefill(model_dir):
    # enable_chunked_prefill: false (the options file's): a chat without max_tokens got OpenAI's default, the rest
    # of max_seq_len, which such an engine refuses (prompt + max_tokens - 1 past max_num_tokens): a 400 for every one
    import asyncio

    from trtllm.config import KvCacheConfig
    from trtllm.runtime.llm import LLM
    from trtllm.serve.jobs import JobBuilder
    from trtllm.serve.protocol import ChatCompletionRequest
    body = ChatCompletionRequest(messages=[{"role": "user", "content": "hi there"}])
    for chunked, room in ((False, lambda n: 64 - n + 1), (True, lambda n: 128 - n)):
        with LLM(str(model_dir), dtype="float32", enable_chunked_prefill=chunked, max_batch_size=4, max_num_tokens=64,
                 max_seq_len=128, kv_cache_config=KvCacheConfig(max_tokens=512)) as llm:
            job = asyncio.run(JobBuilder(llm, "tiny").chat_job(body.model_copy(deep=True)))
        assert job.params[0].max_tokens == room(len(job.prompts[0][1]))
