"""runtime/build_defaults.py: trtllm_build.json written and read back; a bad file is named."""
import pytest

from trtllm.config import QuantAlgo
from trtllm.runtime.build_defaults import BUILD_DEFAULTS_FILE, read_build_defaults, write_build_defaults


def test_round_trip(tmp_path):
    assert read_build_defaults(tmp_path) is None
    write_build_defaults(tmp_path, {"max_batch_size": 3, "max_seq_len": 48}, QuantAlgo.INT8)
    d = read_build_defaults(tmp_path)
    assert (d.build_config.max_batch_size, d.build_config.max_seq_len, d.kv_cache_quant_algo) == (3, 48, QuantAlgo.INT8)
    assert d.build_config.model_fields_set == {"max_batch_size", "max_seq_len"}  # max_input_len follows max_seq_len
    write_build_defaults(tmp_path, {}, None)
    assert read_build_defaults(tmp_path) == type(d)(None, None)


@pytest.mark.parametrize("text, words", [
    ("{", "not valid JSON"),
    ('{"build_config": {"max_batch_size": 0}}', "max_batch_size=0"),
    ('{"build_config": {}, "kv_cache_quant_algo": "FP9"}', "FP9"),
    ('{"max_batch_size": 3}', "expected an object with 'build_config'"),
])
def test_a_bad_file_is_named(tmp_path, text, words):
    (tmp_path / BUILD_DEFAULTS_FILE).write_text(text)
    with pytest.raises(ValueError, match=f"{BUILD_DEFAULTS_FILE}.*{words}"):
        read_build_defaults(tmp_path)
    with pytest.raises(ValueError):
        write_build_defaults(tmp_path, {"max_batch_size": -1}, None)
