import json
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.config import AppConfig, ConfigError, load_config, parse_config
from tests.conftest import ROOT



def test_shipped_configs_validate():
    local = load_config(ROOT / "configs/local.yaml", environ={})
    cluster = load_config(ROOT / "configs/cluster.yaml", environ={})
    assert local.kafka.bootstrap_servers == "127.0.0.1:9092"
    assert local.ray.address is None
    assert cluster.kafka.client["security_protocol"] == "SASL_SSL"


def test_unknown_key_names_its_path():
    with pytest.raises(ConfigError, match=r"kafka\.topics\.resluts: unknown field"):
        parse_config({"kafka": {"topics": {"resluts": "x"}}}, environ={})


def test_wrong_type_names_its_path():
    with pytest.raises(ConfigError, match=r"local_stack\.broker\.port: "):
        parse_config({"local_stack": {"broker": {"port": "not-a-port"}}}, environ={})


def test_out_of_range_value_names_its_path():
    with pytest.raises(ConfigError, match=r"ray\.num_cpus: "):
        parse_config({"ray": {"num_cpus": 0}}, environ={})


def test_environment_overrides_nested_fields_with_types():
    cfg = parse_config(
        {},
        environ={
            "TTT_STREAM__KAFKA__BOOTSTRAP_SERVERS": "broker.example:9093",
            "TTT_STREAM__RAY__NUM_CPUS": "4",
            "TTT_STREAM__KAFKA__CLIENT__SECURITY_PROTOCOL": "SSL",
            "UNRELATED": "1",
        },
    )
    assert cfg.kafka.bootstrap_servers == "broker.example:9093"
    assert cfg.ray.num_cpus == 4
    assert cfg.kafka.client == {"security_protocol": "SSL"}


def test_environment_override_with_unknown_field_fails():
    with pytest.raises(ConfigError, match=r"kafka\.bootstrap: unknown field"):
        parse_config({}, environ={"TTT_STREAM__KAFKA__BOOTSTRAP": "x"})


def test_digest_is_stable_and_sensitive():
    a = parse_config({"stream": {"name": "a"}}, environ={})
    assert a.digest() == parse_config({"stream": {"name": "a"}}, environ={}).digest()
    assert a.digest() != parse_config({"stream": {"name": "b"}}, environ={}).digest()
    assert isinstance(a, AppConfig)


def test_cli_bad_config_prints_one_line_naming_the_field_and_exits_2(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("kafka:\n  topics:\n    partitions: many\n")
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "config", "-c", str(bad)],
        capture_output=True, text=True, cwd=ROOT, timeout=120,
    )
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert "kafka.topics.partitions" in lines[0]


def test_context_parallel_takes_the_safeguards_and_refuses_the_gradient_objective(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"ttt": {"eta": 3.0, "max_delta_ratio": 0.2}}))
    cp = {"context_parallel": {"min_tokens": 8192}}
    ok = parse_config({"model": {"path": str(model), "ttt": {"decay": 0.5, "max_update_norm": 1.0}}, "processor": cp},
                      environ={})
    assert ok.model.effective_ttt().max_delta_ratio == 0.2 and ok.model.effective_ttt().decay == 0.5
    with pytest.raises(ConfigError, match=r"needs the in_place objective .* set by model\.ttt\.objective"):
        parse_config({"model": {"path": str(model), "ttt": {"objective": "gradient"}}, "processor": cp}, environ={})


def test_context_parallel_refuses_unreachable_thresholds():
    ok = parse_config({"processor": {"context_parallel": {"min_tokens": 8192, "world": 2}}}, environ={})
    assert ok.processor.context_parallel.world == 2
    with pytest.raises(ConfigError, match=r"processor\.context_parallel\.min_tokens is above"):
        parse_config({"processor": {"max_document_tokens": 4096, "context_parallel": {"min_tokens": 8192}}},
                     environ={})
    with pytest.raises(ConfigError, match=r"context_parallel reads with slow weights only from the learner"):
        parse_config({"model": {"slow": {"enabled": True}}, "processor": {"context_parallel": {}}}, environ={})
    with_learner = parse_config({"model": {"slow": {"enabled": True}},
                                 "processor": {"context_parallel": {}, "learner": {"enabled": True}}}, environ={})
    assert with_learner.processor.learner.enabled and with_learner.processor.context_parallel is not None


def test_the_learner_needs_slow_weights_and_the_global_scope():
    with pytest.raises(ConfigError, match=r"processor\.learner trains the slow weights: it needs model\.slow"):
        parse_config({"processor": {"learner": {"enabled": True}}}, environ={})
    with pytest.raises(ConfigError, match=r"with scope 'per_key' each reader learns its keys' slow weights"):
        parse_config({"model": {"slow": {"enabled": True}}, "processor": {"scope": "per_key", "learner": {"enabled": True}}},
                     environ={})
    with pytest.raises(ConfigError, match=r"processor\.learner\.lag: "):
        parse_config({"model": {"slow": {"enabled": True}}, "processor": {"learner": {"enabled": True, "lag": 0}}},
                     environ={})
    with pytest.raises(ConfigError, match=r"model\.slow\.rank: Input should be greater than or equal to 1"):
        parse_config({"model": {"slow": {"rank": 0}}}, environ={})
    with pytest.raises(ConfigError, match=r"processor\.context_parallel\.world: "):
        parse_config({"processor": {"context_parallel": {"world": 1}}}, environ={})


def test_placement_strategies_are_ray_s_and_a_context_parallel_group_packs_by_default():
    with pytest.raises(ConfigError, match=r"processor\.placement_strategy: Input should be 'SPREAD', 'PACK'"):
        parse_config({"processor": {"placement_strategy": "spread-ish"}}, environ={})
    config = parse_config({"processor": {"context_parallel": {"world": 2}}}, environ={})
    assert (config.processor.placement_strategy, config.processor.context_parallel.placement_strategy) == ("SPREAD", "PACK")


MARKER = "marker-pa55word-7f3a"


def test_secrets_are_kept_secret_in_dumps_the_digest_and_the_config_command(tmp_path):
    raw = {"kafka": {"client": {"security_protocol": "SASL_SSL", "sasl_mechanism": "SCRAM-SHA-512",
                                "sasl_plain_username": "ttt", "sasl_plain_password": MARKER},
                     "producer": {"ssl_password": MARKER}}}
    cfg = parse_config(raw, environ={})
    # Clients get the secret; nothing printed or hashed holds it.
    assert cfg.kafka.client_settings()["sasl_plain_password"] == MARKER
    assert cfg.kafka.producer_settings() == {**cfg.kafka.client_settings(), "ssl_password": MARKER}
    assert MARKER not in json.dumps(cfg.model_dump(mode="json")) and MARKER not in repr(cfg)
    other = parse_config({**raw, "kafka": {**raw["kafka"], "client": {**raw["kafka"]["client"],
                                                                       "sasl_plain_password": "another"}}}, environ={})
    assert other.digest() == cfg.digest()  # the digest leaves secrets out
    # From the environment, as a deployment passes it, and through `ttt-stream config`.
    path = tmp_path / "c.yaml"
    path.write_text(json.dumps({"kafka": {"client": {"security_protocol": "SASL_SSL"}}}))
    shown = subprocess.run([sys.executable, "-m", "pipeline.cli", "config", "-c", str(path)], capture_output=True,
                           text=True, cwd=ROOT, timeout=120,
                           env={"PATH": "/usr/bin:/bin", "TTT_STREAM__KAFKA__CLIENT__SASL_PLAIN_PASSWORD": MARKER})
    assert shown.returncode == 0, shown.stderr[-2000:]
    assert "sasl_plain_password: '**********'" in shown.stdout and MARKER not in shown.stdout + shown.stderr


def test_min_insync_replicas_cannot_exceed_the_replication_factor():
    with pytest.raises(ConfigError, match=r"min_insync_replicas 3 is above kafka.topics.replication_factor 2"):
        parse_config({"kafka": {"topics": {"replication_factor": 2, "min_insync_replicas": 3}}}, environ={})


def test_the_actors_get_every_path_resolved_in_one_place(monkeypatch, tmp_path):
    from pipeline.processing.actor_specs import as_actors_see_it, context_parallel_spec, reader_spec

    local = load_config(ROOT / "configs/local.yaml", environ={})
    assert not Path(local.model.slow.rehearsal_path).is_absolute() and not Path(local.model.path).is_absolute()
    monkeypatch.chdir(ROOT)
    raw = local.model_dump()
    raw["processor"]["context_parallel"] = {"world": 2, "min_tokens": 4096}
    raw["processor"]["learner"]["synchronous"] = False  # readers beside the learner: the groups read for them
    seen = as_actors_see_it(AppConfig.model_validate(raw))
    spec, cp = reader_spec(seen), context_parallel_spec(seen)
    assert spec.slow.rehearsal_path == cp.slow.rehearsal_path == str(ROOT / local.model.slow.rehearsal_path)
    assert Path(spec.slow.rehearsal_path).is_file()
    assert spec.model_path == cp.model_path == str(ROOT / local.model.path)
    assert spec.spill_dir == str(ROOT / local.processor.spill_dir) and Path(spec.model_cache_dir).is_absolute()
    # A Ray job that ships its working directory: every actor runs in a copy of it.
    shipped = reader_spec(as_actors_see_it(local, job_working_dir=True))
    assert (shipped.model_path, shipped.slow.rehearsal_path) == (local.model.path, local.model.slow.rehearsal_path)
    # The config's other fields reach the spec as they are: nothing of the slow block is re-read.
    assert spec.slow.model_copy(update={"rehearsal_path": None}) == local.model.slow.model_copy(update={"rehearsal_path": None})


def test_ttt_overrides_are_the_fields_written_and_dump_back_as_written():
    config = parse_config({"model": {"ttt": {"decay": 0.5}}}, environ={"TTT_STREAM__MODEL__TTT__ETA": "2.0"})
    assert config.model.ttt.overrides() == {"decay": 0.5, "eta": 2.0}
    assert config.model.model_dump()["ttt"] == {"decay": 0.5, "eta": 2.0}
    assert AppConfig.model_validate(config.model_dump()).model.ttt.overrides() == {"decay": 0.5, "eta": 2.0}
    with pytest.raises(ConfigError, match=r"model\.ttt\.conv_kernel: Value error, the causal convolution needs an odd"):
        parse_config({"model": {"ttt": {"conv_kernel": 4}}}, environ={})

def test_a_secret_from_the_environment_is_the_string_as_written():
    cfg = parse_config({}, environ={"TTT_STREAM__KAFKA__CLIENT__SASL_PLAIN_PASSWORD": "0123",
                                    "TTT_STREAM__KAFKA__CLIENT__SASL_PLAIN_USERNAME": "0123"})
    assert cfg.kafka.client_settings()["sasl_plain_password"] == "0123"  # not 83, not 123
    assert cfg.kafka.client_settings()["sasl_plain_username"] == 83  # not a secret: YAML, as documented
    dumped = json.dumps(cfg.model_dump(mode="json"))
    assert "0123" not in dumped and "**********" in dumped
    # The digest leaves the secret out: two passwords, one digest (nothing to recover from it).
    other = parse_config({}, environ={"TTT_STREAM__KAFKA__CLIENT__SASL_PLAIN_PASSWORD": "9999",
                                      "TTT_STREAM__KAFKA__CLIENT__SASL_PLAIN_USERNAME": "0123"})
    assert cfg.digest() == other.digest()


def test_a_secret_that_yaml_would_read_as_a_number_is_refused_at_load():
    with pytest.raises(ConfigError, match=r"kafka.producer: Value error, sasl_plain_password: a secret must be a string"):
        parse_config({"kafka": {"producer": {"sasl_plain_password": 1234}}}, environ={})


def test_credentials_in_the_tracking_uri_are_masked_in_dumps_and_the_digest():
    cfg = parse_config({"mlflow": {"tracking_uri": "https://ops:hunter2@mlflow.example:5000/x"}}, environ={})
    assert cfg.mlflow.tracking_uri == "https://ops:hunter2@mlflow.example:5000/x"  # the client still gets it
    assert cfg.model_dump(mode="json")["mlflow"]["tracking_uri"] == "https://ops:***@mlflow.example:5000/x"
    other = parse_config({"mlflow": {"tracking_uri": "https://ops:1234@mlflow.example:5000/x"}}, environ={})
    assert cfg.digest() == other.digest()


def test_outputs_must_fit_the_producers_request_size():
    with pytest.raises(ConfigError, match="kafka.max_output_bytes 2000000 is above the producer's max_request_size"):
        parse_config({"kafka": {"max_output_bytes": 2_000_000}}, environ={})
    assert parse_config({"kafka": {"max_output_bytes": 2_000_000, "producer": {"max_request_size": 4_000_000}}},
                        environ={}).kafka.max_output_bytes == 2_000_000


def test_a_per_key_config_whose_states_cannot_fit_its_readers_memory_is_refused():
    model = {"path": str(ROOT / "models/ttt-tiny-qwen3")}
    # 64 states of 2.25 MiB and 13 MiB of weights: 157 MiB.
    with pytest.raises(ConfigError, match=r"max_keys_in_memory 64 states of 2.2 MiB .* do not fit processor.reader_memory_mb 150"):
        parse_config({"model": model, "processor": {"scope": "per_key", "reader_memory_mb": 150}}, environ={})
    ok = parse_config({"model": model, "processor": {"scope": "per_key", "reader_memory_mb": 160}}, environ={})
    assert ok.processor.reader_memory_mb == 160
    assert parse_config({"model": model, "processor": {"scope": "global", "reader_memory_mb": 64}}, environ={})


@pytest.mark.parametrize("uri, shown", [
    ("http://u:p4ss@host:5000/x", "http://u:***@host:5000/x"),
    ("http://u:pa/ss@h:5000/a", "http://u:***@h:5000/a"),  # a / in the password
    ("http://u:p@ss@h", "http://u:***@h"),  # an @ in the password
    ("https://a-token@host/x", "https://***@host/x"),  # a token alone
    ("http://127.0.0.1:5000", "http://127.0.0.1:5000"),
    ("file:///data/mlruns", "file:///data/mlruns"),
])
def test_credentials_in_any_uri_are_masked(uri, shown):
    from pipeline.state.base_model import masked_uri

    assert masked_uri(uri) == shown


def test_global_slow_weights_on_several_readers_need_the_learner():
    with pytest.raises(ConfigError, match=r"processor\.readers 2: each reader would learn slow weights of its own"):
        parse_config({"model": {"slow": {"enabled": True}}, "processor": {"readers": 2}}, environ={})
    for ok in ({"readers": 2, "learner": {"enabled": True}}, {"readers": 1}, {"readers": 2, "scope": "per_key"}):
        assert parse_config({"model": {"slow": {"enabled": True}}, "processor": ok}, environ={}).processor.readers
    # The synchronous learner is the stream's one reader.
    with pytest.raises(ConfigError, match=r"processor\.learner\.synchronous: .* processor\.readers must be 1"):
        parse_config({"model": {"slow": {"enabled": True}},
                      "processor": {"readers": 2, "learner": {"enabled": True, "synchronous": True}}}, environ={})
    # Every shipped config passes.
    for path in sorted((Path(__file__).parents[2] / "configs").glob("*.yaml")):
        load_config(path, environ={})


def test_the_gate_and_the_admission_checks_are_validated_with_their_field_named():
    with pytest.raises(ConfigError, match=r"processor\.learner\.gate\.holdout_fraction"):
        parse_config({"processor": {"learner": {"gate": {"holdout_fraction": 1.5}}}}, environ={})
    with pytest.raises(ConfigError, match=r"processor\.learner\.admission\.key_share"):
        parse_config({"processor": {"learner": {"admission": {"key_share": 0}}}}, environ={})


@pytest.mark.parametrize("old, new, value", [
    ("workers", "readers", 3), ("worker_num_cpus", "reader_num_cpus", 0.5), ("worker_num_gpus", "reader_num_gpus", 0.25),
    ("worker_memory_mb", "reader_memory_mb", 4096), ("max_in_flight_per_worker", "max_in_flight_per_reader", 3),
])
def test_a_config_with_a_key_from_before_the_rename_loads_with_a_warning_naming_the_new_one(tmp_path, old, new, value):
    path = tmp_path / "old.yaml"
    path.write_text(f"processor:\n  {old}: {value}\n")
    with pytest.warns(FutureWarning, match=rf"processor\.{old} is deprecated: it is processor\.{new} now"):
        cfg = load_config(path, environ={})
    assert getattr(cfg.processor, new) == value
    with pytest.warns(FutureWarning, match=rf"TTT_STREAM__PROCESSOR__{old.upper()} is deprecated: it is "
                                           rf"TTT_STREAM__PROCESSOR__{new.upper()} now"):
        from_env = parse_config({}, environ={f"TTT_STREAM__PROCESSOR__{old.upper()}": str(value)})
    assert getattr(from_env.processor, new) == value
    with pytest.raises(ConfigError, match=rf"processor\.{old} and processor\.{new} both given"):
        parse_config({"processor": {old: value, new: value}})


def test_an_old_key_from_the_environment_overrides_the_shipped_config_s_new_one():
    with pytest.warns(FutureWarning, match="TTT_STREAM__PROCESSOR__WORKERS is deprecated"):
        cfg = load_config(ROOT / "configs" / "cluster.yaml", environ={"TTT_STREAM__PROCESSOR__WORKERS": "3"})
    assert cfg.processor.readers == 3
