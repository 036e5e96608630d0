"""The types of the actors' calls load without torch, and so do the pipeline modules that only
pass them along."""

import subprocess
import sys

BLOCK_TORCH = """
import importlib, sys
class BlockTorch:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ImportError("torch is blocked in this test")
sys.meta_path.insert(0, BlockTorch())
for module in sys.argv[1:]:
    importlib.import_module(module)
assert not any(m == "torch" or m.startswith("torch.") for m in sys.modules)
print("imported without torch")
"""

LIGHT = ["actors.call_types", "pipeline.stream_io.messages", "pipeline.processing.ledger", "pipeline.observability.monitor", "pipeline.observability.metrics",
         "pipeline.processing.run_summary", "pipeline.state.checkpoint", "pipeline.config"]


def test_the_call_types_and_the_pipeline_around_them_import_without_torch():
    done = subprocess.run([sys.executable, "-c", BLOCK_TORCH, *LIGHT], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "imported without torch" in done.stdout


def test_the_blocker_does_block_torch():
    done = subprocess.run([sys.executable, "-c", BLOCK_TORCH, "actors.document_reader"], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode != 0 and "torch is blocked" in done.stderr


BLOCK_CLUSTER_CLIENTS = BLOCK_TORCH.replace('name == "torch" or name.startswith("torch.")',
                                            'name.split(".")[0] in ("ray", "mlflow", "kafka")').replace(
    'assert not any(m == "torch" or m.startswith("torch.") for m in sys.modules)\n', "").replace(
    "imported without torch", "imported without ray, mlflow, kafka")


def test_a_reader_and_its_spec_build_without_ray_mlflow_or_kafka():
    """What bench/reader.py runs on a GPU machine that has none of them: the reader, the learner
    and the specs built from the config."""
    modules = ["pipeline.processing.actor_specs", "actors.document_reader", "actors.learner"]
    done = subprocess.run([sys.executable, "-c", BLOCK_CLUSTER_CLIENTS, *modules], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "imported without ray, mlflow, kafka" in done.stdout
    blocked = subprocess.run([sys.executable, "-c", BLOCK_CLUSTER_CLIENTS, "actors.cp_group"], capture_output=True,
                             text=True, timeout=300)
    assert blocked.returncode != 0 and "blocked" in blocked.stderr
