"""Broken model files: every problem is one line that names the file, the field or line and column, and what to do,
raised as a `jaxft.errors` type (and printed as `error: ...` with exit status 2 by the command-line jobs)."""

import json
import shutil

import numpy as np
import pytest

import jaxft
from jaxft.errors import FileFormatError, JaxftError, UnsupportedConfigError
from hf_models import hf_tiny


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny_llama")
    model = hf_tiny("llama_gqa_tied")
    model.save_pretrained(d)
    model.config.to_json_file(d / "config.json")
    return d


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def _raises(kind, path, *fragments):
    """Load `path`, expect `kind`; its message is one line, starts with the file and holds every fragment."""
    with pytest.raises(kind) as e:
        jaxft.load_config(str(path))
    msg = str(e.value)
    assert "\n" not in msg, msg
    for f in fragments:
        assert f in msg, msg
    return msg


def _edit_config(d, **changes):
    cfg = json.loads((d / "config.json").read_text())
    for k, v in changes.items():
        if v is ...:
            cfg.pop(k)
        else:
            cfg[k] = v
    (d / "config.json").write_text(json.dumps(cfg, indent=2))
    return str(d / "config.json")


@pytest.mark.parametrize("field", ["hidden_size", "intermediate_size", "num_attention_heads", "vocab_size"])
def test_config_json_missing_field(tiny_dir, tmp_path, field):
    # before: KeyError('hidden_size') with a traceback
    d = _copy(tiny_dir, tmp_path / "m")
    path = _edit_config(d, **{field: ...})
    _raises(FileFormatError, d, f"{path}: ", f"'{field}'", "missing")
    path = _edit_config(d, **{field: None})
    # before: TypeError: int() argument must be ... not 'NoneType'
    _raises(FileFormatError, d, f"{path}: ", f"'{field}'", "null")


def test_llama3_rope_scaling_without_factor(tiny_dir, tmp_path):
    d = _copy(tiny_dir, tmp_path / "m")
    path = _edit_config(d, rope_scaling={"rope_type": "llama3", "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                         "original_max_position_embeddings": 64})
    # before: KeyError('factor'); the model engineer's from_hf may raise ConfigError itself: any jaxft type naming
    # the file and the field is right
    msg = _raises(JaxftError, d, f"{path}: ", "factor")
    assert "rope" in msg


def test_config_json_not_json_not_utf8_empty(tiny_dir, tmp_path):
    d = _copy(tiny_dir, tmp_path / "m")
    path = str(d / "config.json")
    (d / "config.json").write_text("{\n  'hidden_size': 32\n}\n")
    # before: "not valid JSON (Expecting property name ... at line 2)", no column
    _raises(FileFormatError, d, f"{path} line 2 column 3: not valid JSON")
    (d / "config.json").write_bytes(b'{\n  "name": "caf\xe9"\n}\n')
    # before: 'utf-8' codec can't decode byte 0xe9 in position 16, with a traceback
    _raises(FileFormatError, d, f"{path} line 2 column 15: byte 0xe9 is not UTF-8")
    (d / "config.json").write_text("  \n")
    _raises(FileFormatError, d, f"{path}: is empty")
    (d / "config.json").write_text("[1, 2]")
    _raises(FileFormatError, d, f"{path}: holds a JSON list, expected an object")
    (d / "config.json").unlink()
    _raises(FileFormatError, d, f"{path}: no such file")


def test_missing_model_path_is_a_jaxft_error(tmp_path):
    with pytest.raises(FileFormatError, match="no such file or directory") as e:
        jaxft.load_pretrained(str(tmp_path / "nope"))
    assert "\n" not in str(e.value)
    with pytest.raises(FileFormatError, match="no such file or directory"):
        jaxft.load_tokenizer(str(tmp_path / "nope"))


def test_damaged_index_and_tokenizer(tiny_dir, tmp_path):
    d = _copy(tiny_dir, tmp_path / "m")
    (d / "model.safetensors.index.json").write_text('{"weight_map": {"a": "model.safetensors",}}')
    with pytest.raises(FileFormatError, match=r"index\.json line 1 column 42: not valid JSON"):
        jaxft.load_pretrained(str(d))
    (d / "model.safetensors.index.json").write_text('{"metadata": {}}')
    with pytest.raises(FileFormatError, match="no 'weight_map'"):
        jaxft.load_pretrained(str(d))
    (d / "tokenizer.json").write_text('{"version": "1.0",\n oops}')
    with pytest.raises(FileFormatError, match=r"tokenizer\.json line 2 column 2: not valid JSON"):
        jaxft.load_tokenizer(str(d))


def _gguf(path, drop: str | None = None, rope_scaling: str | None = None):
    """A one-layer llama GGUF with its metadata (without `drop`) and no tensors: enough for `load_config`."""
    import gguf

    hidden, heads = 8, 2
    w = gguf.GGUFWriter(str(path), "llama")
    if rope_scaling:
        w.add_string("llama.rope.scaling.type", rope_scaling)
    calls = {
        "llama.block_count": lambda: w.add_block_count(1),
        "llama.embedding_length": lambda: w.add_embedding_length(hidden),
        "llama.feed_forward_length": lambda: w.add_feed_forward_length(16),
        "llama.attention.head_count": lambda: w.add_head_count(heads),
        "llama.vocab_size": lambda: w.add_vocab_size(10),
    }
    for key, call in calls.items():
        if key != drop:
            call()
    w.add_tensor("token_embd.weight", np.zeros((10, hidden), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return str(path)


@pytest.mark.parametrize("key", ["llama.feed_forward_length", "llama.block_count", "llama.attention.head_count"])
def test_gguf_missing_metadata(tmp_path, key):
    # before: TypeError: int() argument must be ... not 'NoneType', with a traceback
    path = _gguf(tmp_path / "m.gguf", drop=key)
    _raises(FileFormatError, path, f"{path}: GGUF metadata '{key}' is missing")
    full = _gguf(tmp_path / "full.gguf")
    assert jaxft.load_config(full).intermediate_size == 16  # the writer above makes a readable file


def test_gguf_missing_vocabulary(tmp_path):
    path = _gguf(tmp_path / "m.gguf", drop="llama.vocab_size")  # before: KeyError('tokenizer.ggml.tokens')
    _raises(FileFormatError, path, f"{path}: GGUF metadata 'llama.vocab_size' and 'tokenizer.ggml.tokens'")


def test_gguf_empty_and_unsupported_say_where(tmp_path):
    empty = tmp_path / "e.gguf"
    empty.write_bytes(b"")
    _raises(FileFormatError, empty, f"{empty}: is empty")
    path = _gguf(tmp_path / "m.gguf", rope_scaling="yarn")
    _raises(UnsupportedConfigError, path, f"{path}: GGUF RoPE scaling 'yarn'")


def test_chat_cli_prints_one_line(tiny_dir, tmp_path, capsys):
    from jaxft.chat import main

    d = _copy(tiny_dir, tmp_path / "m")
    _edit_config(d, hidden_size=...)
    assert main(["--model", str(d)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "hidden_size" in err, err
    assert main(["--model", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "no such file or directory" in err and "Traceback" not in err, err
