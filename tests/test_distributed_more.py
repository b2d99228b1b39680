"""Beyond one torchrun process group on one machine: two nodes, a worker killed mid-run, FSDP.

Every run here is checked against one single-process reference run with the same global batch
(the math of test_distributed.py: per-step losses and final weights within 1e-5).

This file is also the worker of the fault test: ``python tests/test_distributed_more.py train ...``
runs ``vitkit train``, and rank 1 of the first attempt (TORCHELASTIC_RESTART_COUNT=0) dies with
os._exit(1) after KILL_AFTER_STEPS optimizer steps, as a crashed machine would; ``... signal ...``
runs it with rank 1 sending itself SIGTERM after SIGNAL_AFTER_STEPS steps, as a scheduler
preempting one machine would. The hooks live here, not in vitkit.
"""

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file

KILL_AFTER_STEPS = 6  # mid epoch 2 of 2 (4 steps an epoch); last/ holds epoch 1 by then
SIGNAL_AFTER_STEPS = 4  # rank 1's SIGTERM arrives before step 5; the ranks agree on it at their next read

# No randomness outside the data order (see test_distributed.py); no EMA, which FSDP refuses.
CFG = dict(dataset="digits", model="vit_digits", train_subset=256, batch_size=64, epochs=2, warmup_epochs=1, lr=5e-4,
           drop_path_rate=0.0, translate=0, threads=1, progress="off", precision="fp32", label_smoothing=0.1,
           ema=False)
TOL = 1e-5


def flags(cfg: dict) -> list[str]:
    return [x for k, v in cfg.items() for x in (f"--{k.replace('_', '-')}", str(v))]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(*args: str) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)


def finish(proc: subprocess.Popen, timeout: int = 150) -> str:
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out + err
    return out + err


def weights(ckpt: Path) -> dict:
    return load_file(ckpt / "model.safetensors")


def step_losses(run: Path) -> list[float]:
    from vitkit.train import STATE_NAME

    return torch.load(run / "last" / STATE_NAME, weights_only=True)["step_losses"].tolist()


def assert_same_weights(a: dict, b: dict, tol=TOL):
    assert a.keys() == b.keys()
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst <= tol, f"weights differ by {worst}"


def assert_same_run(run: Path, ref: Path):
    la, lb = step_losses(run), step_losses(ref)
    assert len(la) == len(lb) == 8, (la, lb)
    assert max(abs(x - y) for x, y in zip(la, lb)) <= TOL, (la, lb)
    assert_same_weights(weights(run / "last"), weights(ref / "last"))


pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo")


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """One process, stopped after epoch 1 (its last/ kept as epoch1/) and resumed to the end."""
    from vitkit.train import resolve_config, resume, train

    run = tmp_path_factory.mktemp("ref") / "run"
    n = torch.get_num_threads()
    try:
        with pytest.raises(Exception, match="stopped after epoch 1"):
            train(resolve_config(None, dict(CFG, out=str(run), stop_after_epoch=1)))
        shutil.copytree(run, run.parent / "epoch1")
        resume(run, {"stop_after_epoch": 0})
    finally:
        torch.set_num_threads(n)
    return run


def test_two_nodes_over_c10d_rendezvous_match_one_process(tmp_path, reference):
    # two torchrun agents, one process each, that meet at a c10d rendezvous as two machines would
    # (with gradient checkpointing under DDP: the recomputed forward gives the same gradients)
    run, endpoint = tmp_path / "run", f"127.0.0.1:{free_port()}"
    agents = [torchrun("--nnodes", "2", "--nproc-per-node", "1", "--node-rank", str(i), "--rdzv-backend", "c10d",
                       "--rdzv-endpoint", endpoint, "--rdzv-id", "vitkit-test", "-m", "vitkit", "train",
                       *flags(dict(CFG, out=str(run), grad_checkpointing=True)))
              for i in range(2)]
    logs = [finish(a) for a in agents]
    assert sum("on 2 process(es)" in log for log in logs) == 1  # rank 0 reports, on one node
    assert_same_run(run, reference)


def test_a_killed_worker_is_restarted_and_the_run_resumes_exactly(tmp_path, reference):
    run = tmp_path / "run"
    log = finish(torchrun("--standalone", "--nproc-per-node", "2", "--max-restarts", "1",
                          str(Path(__file__)), "train", *flags(dict(CFG, out=str(run)))))
    assert f"rank 1 dies after {KILL_AFTER_STEPS} steps" in log  # the fault did happen ...
    assert log.count("epoch   1/2") == 1 and log.count("epoch   2/2") == 1  # ... and the restart resumed at epoch 2
    assert_same_run(run, reference)


def test_fsdp_checkpoints_load_in_one_process_and_back(tmp_path, reference):
    import vitkit
    from vitkit.train import resume

    # FSDP2 (2 ranks, gloo), with gradient checkpointing and accumulation (no_sync), stopped after epoch 1
    run = tmp_path / "fsdp"
    fsdp = dict(CFG, out=str(run), strategy="fsdp", grad_checkpointing=True, accum_steps=2, stop_after_epoch=1)
    finish(torchrun("--standalone", "--nproc-per-node", "2", "-m", "vitkit", "train", *flags(fsdp)))
    # the gathered checkpoint is a plain single-process one, equal to the reference at the same step
    assert_same_weights(weights(run / "last"), weights(reference.parent / "epoch1" / "last"))
    x = torch.randn(8, 1, 8, 8)
    with torch.no_grad():
        ours = vitkit.load_pretrained(run / "last").eval()(x)
        ref = vitkit.load_pretrained(reference.parent / "epoch1" / "last").eval()(x)
    assert (ours - ref).abs().max().item() <= TOL
    # FSDP -> one process: the optimizer state of the sharded run continues in a plain one
    resume(run, {"stop_after_epoch": 0, "strategy": "ddp", "grad_checkpointing": False})
    assert_same_run(run, reference)

    # one process -> FSDP: the reference's epoch-1 checkpoint resumed by two sharded ranks
    back = tmp_path / "back"
    shutil.copytree(reference.parent / "epoch1", back)
    finish(torchrun("--standalone", "--nproc-per-node", "2", "-m", "vitkit", "train", "--resume", str(back),
                    "--strategy", "fsdp"))
    assert_same_run(back, reference)


@pytest.mark.parametrize("log_every, stop_step", [(0, 6), (3, 7)], ids=["read-every-step", "read-every-3-steps"])
def test_sigterm_on_one_rank_stops_every_rank_at_the_same_step(tmp_path, reference, log_every, stop_step):
    """Only rank 1 gets SIGTERM. Its flag travels in the step's all_reduce, so both ranks stop at
    the first read that carries it (step 6 reading every step; step 7 with --log-every 3, whose
    reads come at steps 3, 4, 7, 8), write one last/ together and exit 143; had they disagreed, one
    would wait in all_reduce forever. The run then resumes in one process to the reference."""
    from vitkit.train import STATE_NAME, resume

    run = tmp_path / "run"
    proc = torchrun("--standalone", "--nproc-per-node", "2", str(Path(__file__)), "signal",
                    *flags(dict(CFG, out=str(run), log_every=log_every)))
    out, err = proc.communicate(timeout=150)
    assert proc.returncode != 0 and "interrupted by SIGTERM" in out + err, out + err
    state = torch.load(run / "last" / STATE_NAME, weights_only=True)
    assert (state["global_step"], state["epoch"], state["step_in_epoch"]) == (stop_step, 1, stop_step - 4)
    assert len(state["step_losses"]) == stop_step
    resume(run)
    assert_same_run(run, reference)


@pytest.mark.parametrize("on", [False, True])
def test_grad_checkpointing_recomputes_every_block_in_backward(tmp_path, on):
    from vitkit.train import Trainer, resolve_config

    trainer = Trainer(resolve_config(None, dict(CFG, out=str(tmp_path / "run"), grad_checkpointing=on)))
    try:
        calls = []
        for block in trainer.model.encoder.blocks:
            block.register_forward_pre_hook(lambda *_: calls.append(1))  # the recompute may stop before the end
        trainer.train_step(torch.arange(CFG["batch_size"]))
    finally:
        trainer.run.unlock()
    depth = len(trainer.model.encoder.blocks)
    assert len(calls) == (2 * depth if on else depth)  # once in forward, once more in backward when on


def test_fsdp_with_frozen_blocks_matches_one_process(tmp_path):
    """--freeze-blocks under FSDP2: the frozen stem and blocks are sharded with the rest but take no
    step; the two ranks' losses and final weights are one process's, and the frozen ones are the
    pretrained weights bit for bit."""
    from vitkit import create_model, save_pretrained
    from vitkit.train import resolve_config, train

    torch.manual_seed(1)
    save_pretrained(create_model(CFG["model"], num_classes=10), tmp_path / "pre")
    ft = dict(CFG, pretrained=str(tmp_path / "pre"), freeze_blocks=2)
    n = torch.get_num_threads()
    try:
        train(resolve_config(None, dict(ft, out=str(tmp_path / "one"))))
    finally:
        torch.set_num_threads(n)
    finish(torchrun("--standalone", "--nproc-per-node", "2", "-m", "vitkit", "train",
                    *flags(dict(ft, out=str(tmp_path / "fsdp"), strategy="fsdp"))))
    assert_same_run(tmp_path / "fsdp", tmp_path / "one")
    pre, ours = weights(tmp_path / "pre"), weights(tmp_path / "fsdp" / "last")
    frozen = [k for k in pre if k.startswith(("patch_embed.", "encoder.blocks.0.", "encoder.blocks.1."))]
    assert frozen and all(torch.equal(ours[k], pre[k]) for k in frozen)
    assert not torch.equal(ours["head.fc.weight"], pre["head.fc.weight"])


def test_fsdp_requires_ema_off_and_no_fp16(tmp_path):
    from vitkit.train import TrainConfig, Trainer

    with pytest.raises(ValueError, match="--ema false"):
        TrainConfig(strategy="fsdp")
    with pytest.raises(ValueError, match="strategy"):
        TrainConfig(strategy="zero3")
    # fp16's loss scaling is per shard under FSDP; refused before any run folder is made
    with pytest.raises(ValueError, match="--strategy fsdp: fp16's loss scaling"):
        Trainer(TrainConfig(strategy="fsdp", ema=False, precision="fp16", out=str(tmp_path / "run")))
    assert not (tmp_path / "run").exists()


def test_fsdp_evaluation_with_uneven_shards_matches_one_process(tmp_path):
    # 5 images, batches of 2: rank 0 holds 3 (2 batches), rank 1 holds 2 (1 batch). Each FSDP forward
    # all-gathers, so both ranks must run the same number of batches or they wait on each other forever.
    import json

    from vitkit.evaluate import evaluate

    out = tmp_path / "fsdp_eval.json"
    finish(torchrun("--standalone", "--nproc-per-node", "2", str(Path(__file__)), "fsdp-eval", str(out)), timeout=90)
    model, split, preprocess = _eval_case()
    want = evaluate(model, split, preprocess, 10, batch_size=2)
    got = json.loads(out.read_text())
    assert got["images"] == want["images"] == 5
    assert abs(got["loss"] - want["loss"]) <= 1e-6 and got["top1"] == want["top1"] and got["top5"] == want["top5"]


def _eval_case():
    from vitkit.checkpoint import default_preprocess
    from vitkit.data import Split
    from vitkit.model import create_model

    torch.manual_seed(0)
    model = create_model("vit_digits", num_classes=10)
    g = torch.Generator().manual_seed(1)
    split = Split(torch.randint(0, 256, (5, 1, 8, 8), dtype=torch.uint8, generator=g),
                  torch.randint(0, 10, (5,), generator=g))
    return model, split, default_preprocess(model.cfg)


def _fsdp_eval(out: str) -> int:
    """torchrun's worker: evaluate a sharded model on 2 ranks; rank 0 writes the result to ``out``."""
    import datetime
    import json

    from vitkit.distributed import wrap_model
    from vitkit.evaluate import evaluate
    from vitkit.train import DistInfo

    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=30))  # a mismatch fails, not hangs
    info = DistInfo.current()
    model, split, preprocess = _eval_case()
    wrap_model(model, "fsdp", info, torch.device("cpu"))
    result = evaluate(model, split, preprocess, 10, batch_size=2, dist=info)
    if info.is_main:
        Path(out).write_text(json.dumps({k: result[k] for k in ("loss", "top1", "top5", "images")}))
    dist.barrier()  # neither rank tears its gloo pairs down while the other may still use them
    dist.destroy_process_group()
    # as `vitkit train` does: skip Python's finalisation, where gloo's threads can abort the process
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _worker(fault: str) -> int:
    """torchrun's worker for the fault tests: ``vitkit train`` whose rank 1 dies once, mid-run
    (``fault="train"``), or sends itself SIGTERM once (``fault="signal"``)."""
    import signal

    from vitkit import train as vt
    from vitkit.cli import main

    step = vt.Trainer.train_step

    def train_step(self, *args, **kwargs):
        first_attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"
        if fault == "train" and first_attempt and self.dist.rank == 1 and self.global_step == KILL_AFTER_STEPS:
            print(f"rank 1 dies after {KILL_AFTER_STEPS} steps", file=sys.stderr, flush=True)
            os._exit(1)  # no cleanup, no checkpoint: a crash
        if fault == "signal" and self.dist.rank == 1 and self.global_step == SIGNAL_AFTER_STEPS:
            os.kill(os.getpid(), signal.SIGTERM)  # the handler vitkit installed sets the stop flag
        return step(self, *args, **kwargs)

    vt.Trainer.train_step = train_step
    return main(["train", *sys.argv[2:]])  # argv[1] names the fault


if __name__ == "__main__":
    sys.exit(_fsdp_eval(sys.argv[2]) if sys.argv[1] == "fsdp-eval" else _worker(sys.argv[1]))
