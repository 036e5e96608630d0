import io
import json

from pipeline.stream_io.feed import feed_messages


def test_folder_files_become_documents_and_jsonl_lines_pass_unchanged(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / "a.txt").write_text("first document")
    (tmp_path / "b" / "c.md").write_text("second")
    (tmp_path / "d.jsonl").write_text('{"id": "x", "text": "t", "key": "k"}\n\nnot json\n')
    messages = list(feed_messages(tmp_path))
    assert [json.loads(m.value) for m in messages[:2]] == [
        {"id": "a.txt", "text": "first document"}, {"id": "b/c.md", "text": "second"},
    ]
    assert messages[2].value == b'{"id": "x", "text": "t", "key": "k"}' and messages[2].key == b"k"
    assert messages[3].value == b"not json" and messages[3].key is None
    assert len(messages) == 4


def test_stdin_is_jsonl():
    messages = list(feed_messages("-", stdin=io.BytesIO(b'{"text": "a"}\r\n{"text": "b"}\n')))
    assert [m.value for m in messages] == [b'{"text": "a"}', b'{"text": "b"}']
