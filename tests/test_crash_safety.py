"""Crashes and full disks while a checkpoint is written never leave it unloadable.

``save_pretrained`` writes through ``checkpoint.atomic_directory``: files are written and
fsynced in a temporary directory beside the target, then swapped in with one renameat2
(RENAME_EXCHANGE) or, where that is missing, two renames with the old copy kept at
``.NAME.old`` in between. These tests kill real writers with SIGKILL at random moments,
on both paths, and fill the disk mid-save, and load what is left each time.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import select
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch

from crash_helpers import CFG, generation_of, set_generation
from vitkit import ViT, load_pretrained, save_pretrained
from vitkit import checkpoint as ckpt_module
from vitkit.checkpoint import atomic_directory, atomic_file, read_config

HELPER = Path(__file__).with_name("crash_helpers.py")
KILLS = 20


def tree_digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*")) if p.is_file()
    }


def leftovers(parent: Path, name: str) -> list[Path]:
    """Temporaries (and the fallback's .old) that a killed save left beside ``parent/name``."""
    return sorted(p for p in parent.iterdir() if p.name.startswith(f".{name}."))


def readline(proc: subprocess.Popen, timeout: float = 60.0) -> str:
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    if not ready:
        raise TimeoutError(f"crash helper said nothing for {timeout} s")
    line = proc.stdout.readline()
    if not line:
        raise RuntimeError(f"crash helper exited: {proc.stderr.read()}")
    return line.strip()


@pytest.fixture(scope="module")
def reference() -> ViT:
    """A model of CFG to compute what each generation's weights must be."""
    return ViT(CFG)


def load_generation(directory: Path, reference: ViT) -> int:
    """Load the checkpoint, check weights and config.json agree on one generation, return it."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the fallback's recovery warning is checked on its own below
        model = load_pretrained(directory)
        meta = read_config(directory if directory.exists() else directory.parent / f".{directory.name}.old")
    generation = generation_of(model, reference)
    assert generation is not None, "the surviving weights are not any one generation's"
    assert meta["generation"] == generation, "config.json and model.safetensors come from different saves"
    return generation


@pytest.mark.parametrize("mode", ["exchange", "fallback"])
def test_sigkill_at_random_points_during_saves_never_loses_the_checkpoint(tmp_path, reference, mode):
    if mode == "exchange" and not ckpt_module._exchange(tmp_path, tmp_path):
        pytest.skip("renameat2(RENAME_EXCHANGE) is not available here; the fallback run covers saving")
    last = tmp_path / "ckpt" / "last"
    set_generation(reference, 0)
    start = time.perf_counter()
    save_pretrained(reference, last, extra={"generation": 0})  # the good checkpoint to protect
    save_time = time.perf_counter() - start
    rng = random.Random(1234)
    proc = subprocess.Popen(
        [sys.executable, str(HELPER), mode, str(last)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    survivors, mid_write = [0], 0
    try:
        assert readline(proc) == "ready"
        for trial in range(1, KILLS + 1):
            before = set(leftovers(last.parent, "last"))
            proc.stdin.write(f"go {trial * 1000}\n")
            proc.stdin.flush()
            worker = int(readline(proc))
            # up to ~3 saves in: the kill lands anywhere in writing, fsync, swap or clean-up
            time.sleep(rng.uniform(0.0, 3 * max(save_time, 0.05)))
            os.kill(worker, signal.SIGKILL)
            assert readline(proc) == "reaped"
            # a new temporary, or the fallback's .old, exists only between a save's start and its end
            mid_write += bool(set(leftovers(last.parent, "last")) - before)
            generation = load_generation(last, reference)
            # the newest finished save survives: never an older one than the last survivor
            assert generation == survivors[-1] or trial * 1000 <= generation < (trial + 1) * 1000
            survivors.append(generation)
            for p in leftovers(last.parent, "last"):  # what a killed writer leaves: not part of the result
                if ".tmp-" in p.name or last.exists():  # (.old is the only copy while last/ is missing)
                    shutil.rmtree(p)
    finally:
        proc.kill()
        proc.wait()
    print(f"{mode}: {KILLS} SIGKILLs, {mid_write} inside a save; save ~{save_time * 1000:.0f} ms; "
          f"survivors {survivors}")
    # The kills must really land mid-save, not only between saves, for the test to mean anything.
    assert mid_write >= KILLS // 4, f"only {mid_write} of {KILLS} kills interrupted a save"
    assert len(set(survivors)) > KILLS // 4, f"too few saves completed to test replacing: {survivors}"


def test_crash_between_the_fallbacks_two_renames_loads_the_previous_checkpoint(tmp_path, reference):
    last = tmp_path / "last"
    set_generation(reference, 0)
    save_pretrained(reference, last, extra={"generation": 0})
    result = subprocess.run([sys.executable, str(HELPER), "die-between-renames", str(last)], capture_output=True)
    assert result.returncode == 9, result.stderr.decode()
    assert not last.exists() and (tmp_path / ".last.old" / "model.safetensors").is_file()
    with pytest.warns(UserWarning, match="interrupted save"):
        model = load_pretrained(last)
    assert generation_of(model, reference) == 0
    # the next save recovers fully
    set_generation(reference, 2)
    save_pretrained(reference, last, extra={"generation": 2})
    assert load_generation(last, reference) == 2


# --- a full disk -------------------------------------------------------------------------------
def enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def half_then_enospc(state, filename, metadata=None):
    """Write half of what safetensors would, then fail as a full disk does."""
    from safetensors.torch import save

    data = save(state, metadata=metadata)
    Path(filename).write_bytes(data[: len(data) // 2])
    raise OSError(errno.ENOSPC, "No space left on device", str(filename))


@pytest.mark.parametrize("where", ["weights", "config", "fsync", "second_rename"])
@pytest.mark.parametrize("exchange", [True, False], ids=["exchange", "fallback"])
def test_full_disk_during_a_save_is_reported_and_the_previous_checkpoint_survives(
    tmp_path, monkeypatch, where, exchange
):
    small = ViT(CFG.replace(emb_size=24, depth=1, num_heads=2))
    last = save_pretrained(small, tmp_path / "last")
    before = tree_digest(last)
    if not exchange:
        monkeypatch.setattr(ckpt_module, "_exchange", lambda a, b: False)
    if where == "weights":
        monkeypatch.setattr(ckpt_module, "save_file", half_then_enospc)
    elif where == "config":
        monkeypatch.setattr(Path, "write_text", enospc)
    elif where == "fsync":
        monkeypatch.setattr(ckpt_module.os, "fsync", enospc)
    else:
        if exchange:
            pytest.skip("one renameat2 swap: there is no second rename")
        real_rename, calls = os.rename, []

        def rename(src, dst):  # the old copy moves aside, then the disk (or quota) refuses the new one
            calls.append(dst)
            if len(calls) == 2:
                raise OSError(errno.ENOSPC, "No space left on device")
            real_rename(src, dst)

        monkeypatch.setattr(ckpt_module.os, "rename", rename)
    other = ViT(CFG.replace(emb_size=24, depth=1, num_heads=2))
    with pytest.raises(OSError) as info:
        save_pretrained(other, last)
    assert info.value.errno == errno.ENOSPC
    monkeypatch.undo()
    assert tree_digest(last) == before
    assert leftovers(tmp_path, "last") == []  # the temporary directory was removed
    loaded = load_pretrained(last)
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), small.state_dict().values()))


def _mount_tmpfs(path: Path, size: str) -> str | None:
    """Mount a tmpfs of ``size`` at ``path``; the reason it could not, or None."""
    if os.geteuid() != 0:
        return "needs root to mount a tmpfs"
    if shutil.which("mount") is None:
        return "no mount command"
    path.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                            capture_output=True, text=True)
    return None if result.returncode == 0 else f"mount -t tmpfs failed: {result.stderr.strip()}"


def test_real_full_disk_on_a_small_tmpfs(tmp_path):
    disk = tmp_path / "disk"
    reason = _mount_tmpfs(disk, "1m")
    if reason:
        pytest.skip(reason)
    try:
        small = ViT(CFG.replace(emb_size=16, depth=1, num_heads=2))  # ~50 kB
        last = save_pretrained(small, disk / "last")
        before = tree_digest(last)
        big = ViT(CFG.replace(emb_size=256, depth=2, num_heads=2))  # ~6 MB: cannot fit in 1 MB
        with pytest.raises(OSError) as info:
            save_pretrained(big, last)
        assert info.value.errno == errno.ENOSPC
        assert str(last) in str(info.value)  # the message says which save failed
        assert tree_digest(last) == before
        assert leftovers(disk, "last") == []  # and the space is given back
        loaded = load_pretrained(last)
        assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), small.state_dict().values()))
        save_pretrained(small, last)  # the disk is usable again: a save that fits succeeds
    finally:
        subprocess.run(["umount", str(disk)], check=False)


def test_atomic_directory_without_renameat2_replaces_and_cleans_up(tmp_path, monkeypatch):
    """The fallback path, step by step: replaces the old content and leaves no .old behind."""
    monkeypatch.setattr(ckpt_module, "_exchange", lambda a, b: False)
    final = tmp_path / "out"
    for content in ("first", "second"):
        with atomic_directory(final) as tmp:
            (tmp / "a.txt").write_text(content)
        assert (final / "a.txt").read_text() == content
        assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_exchange_swaps_two_directories(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    (a / "f").write_text("A")
    (b / "f").write_text("B")
    if not ckpt_module._exchange(a, b):
        pytest.skip("renameat2(RENAME_EXCHANGE) is not available here")
    assert (a / "f").read_text() == "B" and (b / "f").read_text() == "A"


def test_interrupt_inside_a_save_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    """Ctrl-C (KeyboardInterrupt) in the middle of writing: old checkpoint intact, temporary removed."""
    small = ViT(CFG.replace(emb_size=24, depth=1, num_heads=2))
    last = save_pretrained(small, tmp_path / "last")
    before = tree_digest(last)

    def interrupted(state, filename, metadata=None):
        Path(filename).write_bytes(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(ckpt_module, "save_file", interrupted)
    with pytest.raises(KeyboardInterrupt):
        save_pretrained(ViT(CFG.replace(emb_size=24, depth=1, num_heads=2)), last)
    assert tree_digest(last) == before
    assert leftovers(tmp_path, "last") == []
    assert json.loads((last / "config.json").read_text())["format"] == "vitkit"


# --- interrupted conversions ----------------------------------------------------------------------
def _interrupt_when_writing(cmd: list[str], out: Path, signum: int, timeout: float = 120.0) -> tuple[int, bool]:
    """Run ``cmd``; the moment a temporary for ``out`` appears, send ``signum``. (returncode, hit)."""
    # A shell starts background jobs with SIGINT ignored, and Python keeps an inherited SIG_IGN (no
    # KeyboardInterrupt): give the child the default disposition, as a terminal would.
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    hit, deadline = False, time.monotonic() + timeout
    try:
        while proc.poll() is None and time.monotonic() < deadline:
            if leftovers(out.parent, out.name):
                proc.send_signal(signum)
                hit = True
                break
            time.sleep(0.001)
        proc.wait(timeout=max(deadline - time.monotonic(), 1))
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return proc.returncode, hit


@pytest.mark.parametrize(
    "dst_fmt, out_name, signum, existing",
    [
        ("vitkit", "converted", signal.SIGINT, True),
        ("vitkit", "converted", signal.SIGTERM, False),
        ("timm", "converted.safetensors", signal.SIGINT, False),
        ("timm", "converted.safetensors", signal.SIGTERM, True),
    ],
    ids=["dir-SIGINT-over-existing", "dir-SIGTERM-new", "file-SIGINT-new", "file-SIGTERM-over-existing"],
)
def test_interrupted_conversion_leaves_no_half_written_output(tmp_path, reference, dst_fmt, out_name, signum, existing):
    from vitkit.convert import convert

    src = save_pretrained(reference, tmp_path / "src")
    out = tmp_path / out_name
    if existing:  # a previous conversion's output, which the interrupted one must leave as it was
        convert(src, out, "vitkit", dst_fmt)
        before = tree_digest(out) if out.is_dir() else hashlib.sha256(out.read_bytes()).hexdigest()
    cmd = [sys.executable, "-m", "vitkit", "convert", str(src), str(out), "--from", "vitkit", "--to", dst_fmt]
    for _attempt in range(5):  # the signal must land while the output is being written
        returncode, hit = _interrupt_when_writing(cmd, out, signum)
        if hit and returncode != 0:
            break
        # The conversion finished: the poll missed the write, or the signal came just after it, or
        # Python raised the KeyboardInterrupt inside a destructor, which it reports and ignores.
        # A finished conversion must have written a whole output: check it, put things back, retry.
        assert returncode == 0, returncode
        from safetensors.torch import load_file

        load_file(out / "model.safetensors" if out.is_dir() else out)  # whole, or this raises
        if existing:  # the finished output is what the next attempt must leave as it is
            before = tree_digest(out) if out.is_dir() else hashlib.sha256(out.read_bytes()).hexdigest()
        elif out.is_dir():
            shutil.rmtree(out)
        else:
            out.unlink()
    assert hit and returncode != 0, "never interrupted the conversion mid-write in 5 attempts"
    assert returncode in (130, -signum), returncode  # the CLI reports Ctrl-C as 130; SIGTERM kills
    if existing:
        after = tree_digest(out) if out.is_dir() else hashlib.sha256(out.read_bytes()).hexdigest()
        assert after == before
    else:
        assert not out.exists(), "a half-written output appeared under the final name"
    if signum == signal.SIGINT:  # Python unwinds: the temporaries are removed
        assert leftovers(tmp_path, out_name) == []


# --- killed training ------------------------------------------------------------------------------
def test_training_killed_while_saving_resumes_from_a_whole_checkpoint(tmp_path):
    """SIGKILL (no handler runs) the moment `vitkit train` starts writing last/: last/ stays whole, resume works."""
    from vitkit.cli import main
    from vitkit.train import STATE_NAME

    run = tmp_path / "run"
    cfg = dict(dataset="digits", model="vit_digits", train_subset=128, batch_size=64, epochs=3,
               warmup_epochs=1, threads=1, progress="off", precision="fp32", out=str(run))
    flags = [x for k, v in cfg.items() for x in (f"--{k.replace('_', '-')}", str(v))]
    cmd = [sys.executable, "-m", "vitkit", "train", *flags]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    hit, deadline = False, time.monotonic() + 120
    try:
        while proc.poll() is None and time.monotonic() < deadline:
            # the second save of last/ (the first has something to lose), caught mid-write
            if (run / "last").is_dir() and leftovers(run, "last"):
                proc.kill()
                hit = True
                break
            time.sleep(0.0005)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert hit, f"training ended before a save could be interrupted: {proc.stderr.read().decode()[-2000:]}"
    assert proc.returncode == -signal.SIGKILL
    model = load_pretrained(run / "last")  # the previous save, whole
    state = torch.load(run / "last" / STATE_NAME, weights_only=True)
    assert 1 <= state["epoch"] < 3
    assert model.cfg.num_classes == 10
    threads = torch.get_num_threads()
    try:  # in this process: the lock died with the killed one, and last/ reads back
        assert main(["train", "--resume", str(run)]) == 0
    finally:
        torch.set_num_threads(threads)
    assert torch.load(run / "last" / STATE_NAME, weights_only=True)["epoch"] == 3


def test_interrupted_atomic_file_keeps_the_previous_file(tmp_path):
    """What predict/eval/export outputs go through: Ctrl-C mid-write keeps the old file whole."""
    out = tmp_path / "predictions.csv"
    out.write_text("old,complete\n")
    with pytest.raises(KeyboardInterrupt), atomic_file(out, "w") as f:
        f.write("new,half")
        raise KeyboardInterrupt
    assert out.read_text() == "old,complete\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["predictions.csv"]
