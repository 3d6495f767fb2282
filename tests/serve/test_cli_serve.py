"""trtllm-serve's command line: bad options fail before any model loads, one line per problem."""
from trtllm.cli.serve import main


def test_bad_engine_options_are_named_one_line_each(capsys):
    assert main(["--max_batch_size", "-1", "--kv_cache_free_gpu_memory_fraction", "nan"]) == 2
    err = capsys.readouterr().err
    assert err.splitlines() == ["trtllm-serve: bad option:",
                                "BuildConfig.max_batch_size=-1: must be greater than 0"], err
    assert main(["--kv_cache_free_gpu_memory_fraction", "nan"]) == 2
    err = capsys.readouterr().err
    assert "KvCacheConfig.free_gpu_memory_fraction=nan: must be a finite number" in err
    assert "pydantic" not in err and "Traceback" not in err
