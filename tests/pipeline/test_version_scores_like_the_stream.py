"""A version in MLflow scores like the stream that wrote it (real MLflow server, shipped model).

A DocumentReader with non-default TTT overrides (decay, cap, gradient objective) or slow weights
reads a few documents; its states go through the checkpoint path; then the pyfunc model loaded
from the registry scores a text as the reader reads it, and ``export`` gives a plain model whose
loss is the merged state's.
"""

import uuid
from pathlib import Path

import pytest
import torch
from safetensors.torch import load

from actors.call_types import DocumentTask
from actors.document_reader import DocumentReader
from pipeline.state.checkpoint import LIVE, CheckpointError, CheckpointRequest, CheckpointStore, base_model_id
from pipeline.state.export import export_checkpoint
from tests.sample_text import SAMPLE_TEXT
from pipeline.processing.actor_specs import standalone_reader_spec
from tests.conftest import ROOT, TINY_MODEL, static_loss

pytestmark = [pytest.mark.stack]
MODEL = str(TINY_MODEL)
TEXT = SAMPLE_TEXT
DOCS = [TEXT[i * 1500 : i * 1500 + 1800] for i in range(3)]
PROBE = TEXT[9000:11000]


def checkpoint(stack, *readers: DocumentReader) -> CheckpointStore:
    store = CheckpointStore(stack.mlflow, f"test-{uuid.uuid4().hex[:8]}")
    store.save(CheckpointRequest(
        states={r.name: r.snapshot() for r in readers}, topic="docs", offsets={0: len(DOCS)}, config_digest="c" * 64,
        base_model=base_model_id(MODEL), documents=len(DOCS), reason="periodic", parent_version=None,
        model_config=readers[0].effective_config(),
    ))
    return store


def pyfunc_loss(stack, store: CheckpointStore, text: str, **model_config) -> float:
    import mlflow
    import pandas as pd

    mlflow.set_tracking_uri(stack.mlflow.tracking_uri)
    mlflow.set_registry_uri(stack.mlflow.tracking_uri)
    model = mlflow.pyfunc.load_model(f"models:/{store.name}@{LIVE}", model_config=model_config or None)
    return float(model.predict(pd.DataFrame({"text": [text]}))["loss"][0])


@pytest.mark.parametrize("overrides", [
    {"decay": 0.5},
    {"max_delta_ratio": 0.05, "max_update_norm": 0.5},
    {"objective": "gradient", "gradient_lr": 0.3, "max_delta_ratio": 0.05},
], ids=["decay", "cap-clip", "gradient"])
def test_pyfunc_scores_like_the_reader_and_export_equals_the_merged_state(stack, tmp_path, overrides):
    reader = DocumentReader(standalone_reader_spec(MODEL, device="cpu", ttt=overrides, spill_dir=str(tmp_path)), "w0")
    for i, doc in enumerate(DOCS):
        reader.process(DocumentTask(f"d{i}", doc))
    store = checkpoint(stack, reader)
    assert store.load(LIVE).manifest["model_config"]["ttt"] == reader.effective_config()["ttt"]
    # The reader reads the probe from the same state: the version must score it the same way.
    want = reader.process(DocumentTask("probe", PROBE)).loss
    assert pyfunc_loss(stack, store, PROBE) == pytest.approx(want, rel=1e-5)

    exported = export_checkpoint(store.load(LIVE), tmp_path / "export")
    from transformers import AutoModelForCausalLM

    plain = AutoModelForCausalLM.from_pretrained(exported).eval()
    merged = DocumentReader(standalone_reader_spec(MODEL, device="cpu", ttt=overrides, spill_dir=str(tmp_path)), "w1")
    (blob,) = store.load(LIVE).states["w0"]
    merged.mode.states.restore([blob])
    merged.mode.states.get(None).state.fast.merge_into(merged.model)
    from ttt_model.model.patch import static_mode

    with static_mode(merged.model):
        want_static = static_loss(merged.model, merged.tokenizer, PROBE)
    assert static_loss(plain, merged.tokenizer, PROBE) == pytest.approx(want_static, rel=1e-5)


def test_slow_weights_version_scores_with_slow_plus_fresh_fast_weights(stack, tmp_path):
    spec = standalone_reader_spec(MODEL, device="cpu", slow={"enabled": True, "lr": 3e-3}, spill_dir=str(tmp_path))
    reader = DocumentReader(spec, "w0")
    for i, doc in enumerate(DOCS):
        reader.process(DocumentTask(f"d{i}", doc))
    store = checkpoint(stack, reader)
    (blob,) = store.load(LIVE).states["w0"]
    tensors = load(blob.data)
    assert any(k.startswith("slow.") for k in tensors) and not any(
        t.any() for k, t in tensors.items() if k.endswith(".delta"))  # fast weights end with the document

    # Reference: the slow weights merged densely from the blob's own tensors, fresh fast weights.
    from ttt_model import TTTSession, load_ttt_model

    reference = load_ttt_model(MODEL, dtype=torch.float32).eval()
    scale = spec.slow.alpha / spec.slow.rank
    with torch.no_grad():
        for name in {k[len("slow."):].rsplit(".", 1)[0] for k in tensors if k.endswith(".A")}:
            weight = reference.get_submodule(name).weight
            weight += scale * tensors[f"slow.{name}.B"] @ tensors[f"slow.{name}.A"]
    ids = torch.tensor(reader.tokenizer(PROBE, add_special_tokens=False)["input_ids"])[None]
    with torch.no_grad():
        want = TTTSession(reference).feed(ids).nll[0, 1:].double().mean().item()
    assert pyfunc_loss(stack, store, PROBE) == pytest.approx(want, rel=1e-5)

    exported = export_checkpoint(store.load(LIVE), tmp_path / "export")
    from transformers import AutoModelForCausalLM

    from ttt_model.model.patch import static_mode

    with static_mode(reference):
        want_static = static_loss(reference, reader.tokenizer, PROBE)
    plain = AutoModelForCausalLM.from_pretrained(exported).eval()
    assert static_loss(plain, reader.tokenizer, PROBE) == pytest.approx(want_static, rel=1e-5)


def test_a_per_key_version_loads_as_a_new_tenant_s_model_or_one_tenant_s_by_key(stack, tmp_path):
    """cluster.yaml's scope: with no choice, the version is the model a new tenant starts from."""
    reader = DocumentReader(standalone_reader_spec(MODEL, device="cpu", scope="per_key", spill_dir=str(tmp_path)), "w0")
    reader.process(DocumentTask("a", DOCS[0], key="tenant-a"))
    reader.process(DocumentTask("b", DOCS[1], key="tenant-b"))
    store = checkpoint(stack, reader)
    assert store.load(LIVE).manifest["model_config"]["scope"] == "per_key"
    tenant_b = reader.process(DocumentTask("probe", PROBE, key="tenant-b")).loss
    new_tenant = reader.process(DocumentTask("probe", PROBE, key="tenant-new")).loss
    assert tenant_b != pytest.approx(new_tenant, rel=1e-4)  # the choice matters
    assert pyfunc_loss(stack, store, PROBE) == pytest.approx(new_tenant, rel=1e-5)
    assert pyfunc_loss(stack, store, PROBE, key="tenant-b") == pytest.approx(tenant_b, rel=1e-5)
    meta = export_checkpoint(store.load(LIVE), tmp_path / "export") / "ttt_export.json"
    assert '"key": null' in meta.read_text()


def test_a_version_of_two_readers_own_states_needs_a_choice(stack, tmp_path):
    """The global scope without slow weights on two readers: each reader carries its own fast weights."""
    readers = [DocumentReader(standalone_reader_spec(MODEL, device="cpu", spill_dir=str(tmp_path / n)), n) for n in ("w0", "w1")]
    for reader, doc in zip(readers, DOCS):
        reader.process(DocumentTask("d", doc))
    store = checkpoint(stack, *readers)
    with pytest.raises(Exception, match="holds 2 states"):
        pyfunc_loss(stack, store, PROBE)
    want = readers[1].process(DocumentTask("probe", PROBE)).loss
    assert pyfunc_loss(stack, store, PROBE, reader="w1") == pytest.approx(want, rel=1e-5)
    with pytest.raises(CheckpointError, match="holds 2 states"):
        export_checkpoint(store.load(LIVE), tmp_path / "export")


def test_mlflow_models_serve_answers_invocations_with_the_reader_s_loss(stack, tmp_path):
    """``mlflow models serve -m models:/<stream>-ttt@live --env-manager local``, over HTTP."""
    import json
    import os
    import signal
    import subprocess
    import sys
    import time
    import urllib.error
    import urllib.request

    from tests.conftest import free_port

    reader = DocumentReader(standalone_reader_spec(MODEL, device="cpu", spill_dir=str(tmp_path)), "w0")
    for i, doc in enumerate(DOCS):
        reader.process(DocumentTask(f"d{i}", doc))
    store = checkpoint(stack, reader)
    want = reader.process(DocumentTask("probe", PROBE)).loss  # from the state the version holds

    port = free_port()
    # MLflow starts its scoring server as `uvicorn ...` from PATH: the venv's, as when activated.
    env = {**os.environ, "MLFLOW_TRACKING_URI": stack.mlflow.tracking_uri,
           "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}"}
    server = subprocess.Popen(
        [str(Path(sys.executable).with_name("mlflow")), "models", "serve", "-m", f"models:/{store.name}@{LIVE}",
         "--env-manager", "local", "--host", "127.0.0.1", "--port", str(port)],
        env=env, stdout=open(tmp_path / "serve.log", "wb"), stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2) as response:
                    if response.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError):
                pass
            assert server.poll() is None and time.monotonic() < deadline, (tmp_path / "serve.log").read_text()[-3000:]
            time.sleep(1)
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/invocations", method="POST", headers={"Content-Type": "application/json"},
            data=json.dumps({"dataframe_split": {"columns": ["text"], "data": [[PROBE], [DOCS[0]]]}}).encode())
        with urllib.request.urlopen(request, timeout=120) as response:
            predictions = json.loads(response.read())["predictions"]
        assert len(predictions) == 2 and all(p["tokens"] > 1 for p in predictions)
        assert predictions[0]["loss"] == pytest.approx(want, rel=1e-5)
        bad = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", method="POST",
                                     headers={"Content-Type": "application/json"},
                                     data=json.dumps({"dataframe_split": {"columns": ["body"], "data": [["x"]]}}).encode())
        with pytest.raises(urllib.error.HTTPError) as refused:  # the signature: a "text" column
            urllib.request.urlopen(bad, timeout=60)
        assert refused.value.code == 400
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
