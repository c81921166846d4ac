"""Broken data files: one line naming the source, the file, the line and column (in characters), and what to do, as
a `jaxft.errors` type; `python -m jaxft.data` prints it as `error: ...` and exits 2."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import yaml
from data_helpers import LLAMA3_TEMPLATE, chat, make_tiny_tokenizer, write_jsonl

from jaxft.data import DataConfig, SourceConfig, prepare
from jaxft.data.sources import read_source
from jaxft.errors import ConfigError, FileFormatError


def _read(path, **kw):
    return read_source(SourceConfig(path=str(path), **kw), "data.train[0]")


def _one_line(e) -> str:
    msg = str(e.value)
    assert "\n" not in msg, msg
    return msg


def test_jsonl_not_utf8_names_line_and_column(tmp_path):
    path = tmp_path / "d.jsonl"
    good = json.dumps(chat("hi", "hello")).encode()
    path.write_bytes(good + b"\n" + b'{"text": "d\xc3\xa9j\xe0 vu"}\n')
    # before: UnicodeDecodeError "'utf-8' codec can't decode byte 0xe0 in position 79", with no file name
    with pytest.raises(FileFormatError) as e:
        _read(path)
    # column 14 in characters: `{"text": "déj` is 13 characters (é is 2 bytes)
    assert _one_line(e) == (f"data.train[0]: {path} line 2 column 14: byte 0xe0 is not UTF-8; save the file as "
                            "UTF-8 (e.g. iconv -f latin1 -t utf-8 in > out)")


def test_malformed_lines_report_their_own_file_line_and_column(tmp_path):
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps(chat(f"q{i}", "a")) for i in range(3)) + "\n")
    # line 2 of b.jsonl: a tab and a two-byte character before the error, which is at character 19
    (tmp_path / "b.jsonl").write_text(json.dumps(chat("x", "y")) + '\n\t{"text": "héllo",}\n')
    raw = _read(tmp_path / "*.jsonl")
    reasons = [v for _, v in raw.records if isinstance(v, str)]
    # before: "not valid JSON (... at column 19)" under the glob's running line number 5, with no file named
    assert reasons == ["b.jsonl line 2: not valid JSON (Expecting property name enclosed in double quotes at "
                       "column 19)"]


def test_byte_order_mark_and_carriage_returns(tmp_path):
    path = tmp_path / "bom.jsonl"
    # a BOM (Windows editors), CRLF line ends, and a stray CR inside a record that is not a line break for JSON
    lines = [json.dumps(chat("a", "b")), json.dumps({"text": "one"}), json.dumps({"text": "two"})]
    path.write_bytes(b"\xef\xbb\xbf" + "\r\n".join(lines).encode() + b"\r\n" + b'{"text": "x\ry"}\r\n')
    raw = _read(path)
    # before: line 1 was malformed ("Unexpected UTF-8 BOM"), and the stray CR split line 4 into two lines
    assert [n for n, v in raw.records if isinstance(v, dict)] == [1, 2, 3]
    assert [(n, v.split(" (")[0]) for n, v in raw.records if isinstance(v, str)] == [(4, "not valid JSON")]


@pytest.mark.parametrize("suffix, content", [(".jsonl", b""), (".jsonl", b"\n  \n"), (".json", b" "),
                                             (".json", b"[]"), (".csv", b""), (".parquet", b"")])
def test_empty_file_says_it_is_empty(tmp_path, suffix, content):
    path = tmp_path / f"d{suffix}"
    path.write_bytes(content)
    # before: "no usable record (0 read, 0 malformed)" for JSONL, a datasets error for the others
    with pytest.raises(FileFormatError) as e:
        _read(path)
    assert _one_line(e).startswith(f"data.train[0]: {path}: is empty (no records); fill it or remove it")


def test_json_file_errors_have_line_and_column(tmp_path):
    path = tmp_path / "d.json"
    path.write_text('[\n  {"prompt": "a", "completion": "b"},\n  {"prompt": "c" "completion": "d"}\n]\n')
    # before: datasets' "An error occurred while generating the dataset" or a pyarrow error, no line
    with pytest.raises(FileFormatError) as e:
        _read(path)
    assert _one_line(e).startswith(f"data.train[0]: {path} line 3 column 18: not valid JSON (Expecting ',' delimiter)")
    path.write_text(json.dumps({"prompt": "a"}))
    with pytest.raises(FileFormatError, match="holds a JSON dict; expected an array of records"):
        _read(path)
    # the readable forms: an array of records, and JSON Lines under a .json name
    path.write_text(json.dumps([{"prompt": "a", "completion": "b"}, 3]))
    raw = _read(path)
    assert raw.unit == "record" and raw.records == [(1, {"prompt": "a", "completion": "b"}),
                                                    (2, "a JSON int, not an object")]
    path.write_text(json.dumps({"text": "a"}) + "\n" + json.dumps({"text": "b"}) + "\n")
    raw = _read(path, limit=1)
    assert raw.unit == "line" and raw.records == [(1, {"text": "a"})]


def test_csv_not_utf8(tmp_path):
    path = tmp_path / "d.csv"
    path.write_bytes(b"instruction,output\nAdd,3\nCaf\xe9,4\n")
    # before: datasets' "'utf-8' codec can't decode byte 0xe9 in position 3" (a position in some chunk)
    with pytest.raises(FileFormatError) as e:
        _read(path)
    assert _one_line(e).startswith(f"data.train[0]: {path} line 3 column 4: byte 0xe9 is not UTF-8")
    pd.DataFrame({"instruction": ["Add"], "output": ["3"]}).to_csv(path, index=False)
    assert _read(path).records == [(1, {"instruction": "Add", "output": 3})]


def test_on_malformed_fail_is_a_file_format_error(tmp_path, tiny_llama3):
    path = write_jsonl(tmp_path / "t.jsonl", [chat("a", "b"), '{"messages": [}'])
    with pytest.raises(FileFormatError) as e:  # before: a plain ValueError
        prepare(DataConfig(train=(SourceConfig(path),), on_malformed="fail"), tiny_llama3)
    assert _one_line(e).startswith(f"data.train[0]: {path} line 2: not valid JSON (Expecting value at column 15)")


def _config(tmp_path, data, model) -> str:
    path = tmp_path / "train.yaml"
    path.write_text(yaml.safe_dump({"model": {"path": str(model)}, "data": data}))
    return str(path)


def test_data_cli_prints_one_line(tmp_path, capsys):
    from jaxft.data.cli import main

    tok_dir = tmp_path / "tok"
    make_tiny_tokenizer(LLAMA3_TEMPLATE).save_pretrained(tok_dir)
    bad = tmp_path / "d.jsonl"
    bad.write_bytes(b'{"text": "\xff"}\n')
    assert main(["inspect", _config(tmp_path, {"train": [str(bad)]}, tok_dir)]) == 2
    err = capsys.readouterr().err
    assert err == f"error: data.train[0]: {bad} line 1 column 11: byte 0xff is not UTF-8; save the file as UTF-8 " \
                  "(e.g. iconv -f latin1 -t utf-8 in > out)\n"
    good = write_jsonl(tmp_path / "g.jsonl", [chat("a", "b")])
    assert main(["inspect", _config(tmp_path, {"train": [good]}, tmp_path / "no-model")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {tmp_path / 'no-model'}: no such file or directory") and err.count("\n") == 1


def test_yaml_config_errors_have_line_and_column(tmp_path):
    from jaxft.schema import load_yaml

    path = tmp_path / "c.yaml"
    path.write_text("data:\n  train: [a.jsonl\n  seq_len: 8\n")
    with pytest.raises(ConfigError, match=r"c\.yaml line 3 column 10: not valid YAML"):
        load_yaml(str(path))
    path.write_bytes(b"output_dir: caf\xe9\n")
    with pytest.raises(FileFormatError, match=r"c\.yaml line 1 column 16: byte 0xe9 is not UTF-8"):
        load_yaml(str(path))
    with pytest.raises(FileFormatError, match="is a directory"):
        load_yaml(str(tmp_path))


def test_check_sources_needs_no_tokenizer(tmp_path):
    from jaxft.data import check_sources

    train = write_jsonl(tmp_path / "t.jsonl", [chat("a", "b"), chat("a", "b"), "{oops", chat("c", "d"), chat("e", "f")])
    stats = check_sources(DataConfig(train=(SourceConfig(train),), eval_size=1))
    st, ev = stats
    assert (st.read, st.malformed, st.duplicates, st.to_eval, st.kept) == (5, 1, 1, 1, 2)
    assert (ev.where, ev.kept) == ("data.eval", 1)
    with pytest.raises(FileFormatError, match=r"t\.jsonl line 3: not valid JSON"):
        check_sources(DataConfig(train=(SourceConfig(train),), on_malformed="fail"))
