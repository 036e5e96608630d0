"""`ttt-stream feed`, `run --until-idle` and `status` as a user runs them, on the real stack."""

import json

import pytest
import yaml

from tests.conftest import ROOT, cli
from tests.pipeline.test_stream_e2e import read_topic, stream_config
from tests.sample_text import SAMPLE_TEXT

pytestmark = [pytest.mark.stack, pytest.mark.slow]


def test_feed_run_status_from_the_command_line(stack, tmp_path):
    config = stream_config(stack, tmp_path, readers=1, reader_num_cpus=1, base_loss_sample_rate=1.0)
    config_file = tmp_path / "config.yaml"
    config_file.write_text(yaml.safe_dump(config.model_dump(mode="json")))
    folder = tmp_path / "docs"
    folder.mkdir()
    (folder / "readme.md").write_text(SAMPLE_TEXT[:3000])
    (folder / "design.txt").write_text((ROOT / "pyproject.toml").read_text())

    fed = cli("feed", str(folder), "-c", str(config_file))
    assert fed.returncode == 0, fed.stderr[-2000:]
    assert "sent 2 messages" in fed.stdout
    fed = cli("feed", "-", "-c", str(config_file), stdin='{"id": "s1", "text": "From standard input."}\n{oops\n')
    assert fed.returncode == 0 and "sent 2 messages" in fed.stdout, fed.stderr[-2000:]

    ran = cli("run", "-c", str(config_file), "--until-idle", "3")
    assert ran.returncode == 0, ran.stderr[-3000:]
    assert "documents" in ran.stdout and "adapted vs static" in ran.stdout
    results = {json.loads(r.value)["id"] for r in read_topic(config, config.kafka.topics.results, expect=3)}
    assert results == {"readme.md", "design.txt", "s1"}
    assert len(read_topic(config, config.kafka.topics.dead_letter, expect=1)) == 1

    shown = cli("status", "-c", str(config_file))
    assert shown.returncode == 0, shown.stderr[-2000:]
    assert "3 documents, 1 dead letters" in shown.stdout
    assert f"{config.stream.name}-reader-0" in shown.stdout
