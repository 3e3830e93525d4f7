"""Two CPU processes (gloo) under ``accelerate launch``: both ranks end with identical weights.

The file is also the worker script: ``accelerate launch`` runs it with an output folder.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.slow
def test_two_cpu_processes_finish_with_identical_parameters(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    # `accelerate launch --cpu` starts several CPU processes only through mpirun; the torchrun
    # path (--multi_gpu) with ACCELERATE_USE_CPU=1 gives the same MULTI_CPU (gloo) run.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "ACCELERATE_USE_CPU": "1", "ACCELERATE_DISABLE_RICH": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes",
           "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(_free_port()), __file__, str(tmp_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    info = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [i["world"] for i in info] == [2, 2]
    assert info[0]["distributed_type"] == "MULTI_CPU"
    # The ranks saw different data (each its own shard of the stream) ...
    assert info[0]["first_batch"] != info[1]["first_batch"]
    # ... yet report the same all-reduced losses and end with the same weights.
    assert info[0]["losses"] == info[1]["losses"]
    a, b = (load_file(str(tmp_path / f"rank{r}.safetensors")) for r in (0, 1))
    init = load_file(str(tmp_path / "init.safetensors"))
    assert a.keys() == b.keys() and len(a) > 0
    for k in a:
        assert (a[k] == b[k]).all(), k
    assert any(not (a[k] == init[k]).all() for k in a)  # and training changed them
    # The checkpoint written by two processes is complete (both RNG states, one weight copy).
    ckpt = tmp_path / "ck" / "step-00000003"
    assert {"random_states_0.pkl", "random_states_1.pkl", "trainer_state.json"} <= {
        p.name for p in ckpt.iterdir()}


def _worker(out: Path) -> None:
    import torch

    torch.set_num_threads(1)
    sys.path.insert(0, str(Path(__file__).parent))
    from test_training import build

    from sigmarec.training import TrainingConfig, make_accelerator, train_sigma
    from sigmarec.training.loop import ExampleStream

    cfg = TrainingConfig(steps=3, per_device_batch_size=3, grad_accum_steps=2, hard_negatives=2,
                         checkpoint_every=3, eval_every=3, warmup_ratio=0.0,
                         mixed_precision="no")
    acc = make_accelerator(cfg)
    model, examples = build(n_examples=16)
    if acc.is_main_process:
        model.save_trainable(out / "init_folder")
        (out / "init_folder" / "sigma_trainable.safetensors").rename(out / "init.safetensors")
    result = train_sigma(model, examples, cfg, seed=0, checkpoint_dir=out / "ck",
                         valid_examples=examples[:5], accelerator=acc, progress=False)
    from safetensors.torch import save_file

    rank = acc.process_index
    save_file(model.trainable_state(), str(out / f"rank{rank}.safetensors"))
    first = ExampleStream(len(examples), 0).take(rank * 3, 3).tolist()
    (out / f"rank{rank}.json").write_text(json.dumps({
        "world": acc.num_processes, "distributed_type": result.setup["distributed_type"],
        "losses": [h["loss"] for h in result.history], "first_batch": first,
    }))
    acc.wait_for_everyone()
    acc.end_training()


if __name__ == "__main__":
    _worker(Path(sys.argv[1]))
