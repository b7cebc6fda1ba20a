"""Promises to a careless or hostile user (docs/promises.md): safe checkpoints, outputs that never
destroy anything, one-line errors, resumable runs, reproducible seeds, clean ends on signals."""

from __future__ import annotations

import errno
import fcntl
import os
import re
import shutil
import signal
import stat
import threading
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import yaml
from typer.testing import CliRunner

import caloadapt
from caloadapt._atomic import atomic_path
from caloadapt.cli import app
from caloadapt.data import read_showers, write_showers
from caloadapt.errors import CheckpointError, OutputError
from caloadapt.pretrained import SHIPPED_CHECKPOINTS
from caloadapt.simulate import simulate
from caloadapt.train import load_checkpoint
from caloadapt.train.loop import ModelLosses

#: a tiny model and run: two steps, one validation
TINY_MODEL = ["--widths", "16,16", "--flow-hidden", "16", "--flow-transforms", "1"]
TINY_RUN = ["--steps", "2", "--batch-size", "4", "--max-points", "32", "--val-every", "2", "--device", "cpu",
            *TINY_MODEL]


@pytest.fixture
def run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Invoke the app in ``tmp_path``; stdout and stderr are kept apart."""
    monkeypatch.chdir(tmp_path)
    runner = CliRunner()

    def invoke(*args):
        return runner.invoke(app, [str(a) for a in args])

    return invoke


def _error_lines(result) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.startswith("caloadapt: error: ")]


def assert_one_line_error(result, *words: str, status: int = 2) -> str:
    """Exit ``status``, exactly one ``caloadapt: error:`` line (the last line of stderr), no traceback."""
    assert result.exit_code == status, (result.exit_code, result.stdout, result.stderr, result.exception)
    lines = _error_lines(result)
    assert len(lines) == 1, result.stderr
    assert result.stderr.strip().splitlines()[-1] == lines[0], result.stderr  # nothing after it
    assert "Traceback" not in result.stderr + result.stdout
    for word in words:
        assert word in lines[0], (word, lines[0])
    return lines[0]


def assert_no_temporary_files(folder: Path) -> None:
    left = [p.name for p in folder.rglob("*") if p.name.endswith(".tmp")]
    assert not left, left


@pytest.fixture(scope="module")
def ild_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "ild.h5"
    write_showers(path, simulate("ild-ecal", "photon", np.random.default_rng(0).uniform(10e3, 20e3, 12), seed=1))
    return path


@pytest.fixture(scope="module")
def tiny_run(ild_file, tmp_path_factory) -> Path:
    """A finished two-step training run made by the command line."""
    out = tmp_path_factory.mktemp("runs") / "tiny"
    result = CliRunner().invoke(app, ["train", "--data", str(ild_file), "-o", str(out), *TINY_RUN])
    assert result.exit_code == 0, result.stderr
    assert (out / "loss_curves.png").is_file() and "loss_curves.png" in result.stdout
    return out


def _copy_points_file(source: Path, target: Path, **replace) -> Path:
    """A copy of a points file with some datasets replaced."""
    with h5py.File(source) as src, h5py.File(target, "w") as dst:
        dst.attrs.update(dict(src.attrs))
        for key in ("points", "offsets", "incident_energy_mev"):
            dst[key] = replace.get(key, src[key][:])
    return target


# -- 1. a checkpoint is data, never code ------------------------------------------------------------------
class _Payload:
    """Pickles as a call of os.mkdir: what a hostile checkpoint carries."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (str(self.marker),)


def _planted_checkpoint(good: Path, target: Path, marker: Path) -> Path:
    payload = torch.load(good, weights_only=True)
    torch.save({**payload, "extra": _Payload(marker)}, target)
    return target


def test_planted_payload_is_refused_without_running(tiny_run, tmp_path):
    marker = tmp_path / "payload-ran"
    evil = _planted_checkpoint(tiny_run / "best.pt", tmp_path / "evil.pt", marker)
    with pytest.raises(CheckpointError, match="refused"):
        load_checkpoint(evil)
    assert not marker.exists()


@pytest.mark.parametrize("command", ["generate", "export", "finetune", "analyze-updates", "resume"])
def test_planted_payload_is_refused_by_every_command(run, tiny_run, ild_file, tmp_path, command):
    marker = tmp_path / "payload-ran"
    evil = _planted_checkpoint(tiny_run / "best.pt", tmp_path / "evil.pt", marker)
    args = {"generate": ["generate", "--checkpoint", evil, "-o", "g.h5", "--n", "2", "-g", "ild-ecal"],
            "export": ["export", "--checkpoint", evil, "-o", "e.pt"],
            "finetune": ["finetune", "--checkpoint", evil, "--data", ild_file, "-o", "ft", "--steps", "1"],
            "analyze-updates": ["analyze-updates", tiny_run / "best.pt", evil, "-o", "updates"]}
    if command == "resume":
        (tmp_path / "run").mkdir()
        _planted_checkpoint(tiny_run / "last.pt", tmp_path / "run" / "last.pt", marker)
        args["resume"] = ["train", "--data", ild_file, "-o", "run", "--resume", *TINY_RUN]
    assert_one_line_error(run(*args[command]), "refused")
    assert not marker.exists()


def test_package_loads_checkpoints_weights_only():
    package = Path(caloadapt.__file__).parent
    calls = [(p.name, line) for p in package.rglob("*.py") for line in p.read_text().splitlines()
             if "torch.load(" in line]
    assert calls, "the checkpoint loader calls torch.load"
    assert all("weights_only=True" in line for _, line in calls), calls


@pytest.mark.parametrize("name", list(SHIPPED_CHECKPOINTS))
def test_shipped_checkpoints_load_weights_only(name):
    """Every shipped model loads by name as data, and generates a finite shower with its own sampler."""
    from caloadapt.geometry import get_geometry
    from caloadapt.models.checkpoint import load_model

    payload = load_checkpoint(name)
    assert payload["format"] == "caloadapt-checkpoint" and payload["model"]
    model, sampler = load_model(name)
    geometry = get_geometry("ild-ecal")
    showers = model.eval().generate(geometry, np.array([20e3]), sampler.with_steps(min(sampler.steps, 2)),
                                    generator=torch.Generator().manual_seed(0), particle="photon")
    assert showers.n_points[0] > 0 and np.all(np.isfinite(showers.points))


def test_plain_extra_entries_stay_loadable(tiny_run, tmp_path):
    payload = torch.load(tiny_run / "best.pt", weights_only=True)
    extra = {"fidelity": {"weights": [0.5, 1.0], "scale": 2.5, "table": torch.arange(3.0), "name": "x"}}
    torch.save({**payload, **extra}, tmp_path / "plain.pt")
    loaded = load_checkpoint(tmp_path / "plain.pt")
    assert loaded["fidelity"]["weights"] == [0.5, 1.0]
    assert torch.equal(loaded["fidelity"]["table"], torch.arange(3.0))


# -- 2. outputs never replace what is not a regular file ---------------------------------------------------
def test_output_onto_a_character_device_is_refused(run, tmp_path):
    device = tmp_path / "null"
    try:
        os.mknod(device, 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    except PermissionError:
        pytest.skip("mknod needs CAP_MKNOD")
    assert_one_line_error(run("simulate", "-o", device, "--n", "2"), "character device")
    assert stat.S_ISCHR(os.lstat(device).st_mode)
    assert_no_temporary_files(tmp_path)


@pytest.mark.parametrize("kind", ["directory", "fifo"])
def test_output_onto_a_directory_or_fifo_is_refused(run, tmp_path, kind):
    target = tmp_path / "target"
    target.mkdir() if kind == "directory" else os.mkfifo(target)
    assert_one_line_error(run("simulate", "-o", target, "--n", "2"), "target", "not a regular file")
    assert target.is_dir() if kind == "directory" else stat.S_ISFIFO(os.lstat(target).st_mode)
    assert_no_temporary_files(tmp_path)


def test_output_through_a_symlink_replaces_the_linked_file_and_keeps_the_link(tmp_path):
    real = tmp_path / "real.json"
    real.write_text("old")
    link = tmp_path / "link.json"
    link.symlink_to(real)
    with atomic_path(link) as tmp:
        tmp.write_text("new")
    assert link.is_symlink() and os.readlink(link) == str(real)
    assert real.read_text() == "new"
    dangling = tmp_path / "dangling.json"
    dangling.symlink_to(tmp_path / "nowhere" / "file.json")
    with pytest.raises(OutputError, match="dangling"):
        with atomic_path(dangling) as tmp:
            tmp.write_text("x")
    assert not (tmp_path / "nowhere").exists()
    assert_no_temporary_files(tmp_path)


def test_replaced_output_keeps_its_mode(tmp_path):
    target = tmp_path / "private.json"
    target.write_text("old")
    target.chmod(0o600)
    with atomic_path(target) as tmp:
        tmp.write_text("new")
    assert target.read_text() == "new"
    assert stat.S_IMODE(target.stat().st_mode) == 0o600


def test_output_in_an_unwritable_place_is_one_line(run, tmp_path, monkeypatch):
    import tempfile

    def refuse(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied")

    original = tempfile.mkstemp
    monkeypatch.setattr(tempfile, "mkstemp", refuse)  # as root, chmod would not stop us
    assert_one_line_error(run("simulate", "-o", "out.h5", "--n", "2"), "out.h5", "Permission denied")
    (tmp_path / "file").write_text("")
    monkeypatch.setattr(tempfile, "mkstemp", original)
    assert_one_line_error(run("simulate", "-o", "file/out.h5", "--n", "2"), "file/out.h5")


# -- 3. a full disk is one line and leaves nothing ---------------------------------------------------------
class _FullDisk:
    """Stands in for the raw output file: accepts ``capacity`` bytes, then fails with ENOSPC."""

    def __init__(self, raw, capacity: int):
        self.raw, self.capacity = raw, capacity

    def write(self, data) -> int:
        if self.raw.tell() + len(data) > self.capacity:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return self.raw.write(data)

    def __getattr__(self, name):
        return getattr(self.raw, name)


@pytest.mark.parametrize("fmt", ["points", "calochallenge"])
def test_full_disk_during_simulation_is_one_line_and_leaves_nothing(run, tmp_path, monkeypatch, fmt):
    from caloadapt.data import io as shower_io

    original = shower_io._OutputFile.__init__

    def small_disk(self, path):
        original(self, path)
        self.raw = _FullDisk(self.raw, 64 * 1024)

    monkeypatch.setattr(shower_io._OutputFile, "__init__", small_disk)
    geometry = ["-g", "calochallenge-2"] if fmt == "calochallenge" else []
    result = run("simulate", "-o", "out.h5", "--n", "40", "-f", fmt, *geometry, "--energy", "5:20")
    assert_one_line_error(result, "out.h5", "No space left on device")
    assert not (tmp_path / "out.h5").exists()
    assert_no_temporary_files(tmp_path)


def test_full_disk_keeps_the_previous_output(run, tmp_path, monkeypatch):
    from caloadapt.data import io as shower_io

    assert run("simulate", "-o", "out.h5", "--n", "2").exit_code == 0
    before = (tmp_path / "out.h5").read_bytes()
    original = shower_io._OutputFile.__init__

    def no_space(self, path):
        original(self, path)
        self.raw = _FullDisk(self.raw, 0)

    monkeypatch.setattr(shower_io._OutputFile, "__init__", no_space)
    assert_one_line_error(run("simulate", "-o", "out.h5", "--n", "5"), "No space left on device")
    assert (tmp_path / "out.h5").read_bytes() == before
    assert_no_temporary_files(tmp_path)


def test_full_disk_writing_text_outputs_is_an_output_error(tmp_path):
    target = tmp_path / "report.json"
    with pytest.raises(OutputError, match="report.json: cannot write: No space left on device"):
        with atomic_path(target) as tmp:
            tmp.write_text("partial")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp))
    assert not target.exists()
    assert_no_temporary_files(tmp_path)


# -- 4. the same seed gives the same checkpoint -----------------------------------------------------------
@pytest.mark.parametrize("command", ["train", "pretrain"])
def test_same_seed_gives_identical_checkpoints(run, ild_file, command):
    for k, out in enumerate(("a", "b")):
        torch.manual_seed(1000 + k)  # whatever state the global generator is in, as in a new process
        assert run(command, "--data", ild_file, "-o", out, "--seed", "3", *TINY_RUN).exit_code == 0
    a, b = load_checkpoint("a/last.pt"), load_checkpoint("b/last.pt")
    for key in ("model", "ema"):
        different = [name for name in a[key] if not torch.equal(a[key][name], b[key][name])]
        assert not different, different
    assert run(command, "--data", ild_file, "-o", "c", "--seed", "4", *TINY_RUN).exit_code == 0
    c = load_checkpoint("c/last.pt")
    assert any(not torch.equal(a["model"][name], c["model"][name]) for name in a["model"])


# -- 5. SIGTERM and SIGHUP end cleanly ----------------------------------------------------------------------
@pytest.mark.parametrize("signum, status", [(signal.SIGTERM, 143), (signal.SIGHUP, 129), (signal.SIGINT, 130)])
def test_signal_during_simulation_removes_the_output(run, tmp_path, monkeypatch, signum, status):
    import caloadapt.simulate as simulate_module

    original = simulate_module.iter_simulate

    def signalled(*args, **kwargs):
        for k, chunk in enumerate(original(*args, **kwargs)):
            yield chunk
            if k == 0:
                os.kill(os.getpid(), signum)  # as Slurm / timeout / a closed terminal would

    monkeypatch.setattr(simulate_module, "iter_simulate", signalled)
    monkeypatch.setattr("caloadapt.simulate.simulator.SPOTS_PER_CHUNK", 20_000)  # several chunks
    inherited = signal.signal(signum, signal.SIG_DFL)  # as from a terminal (a CI job may ignore some)
    try:
        result = run("simulate", "-o", "out.h5", "--n", "30", "--energy", "10:20")
        assert signal.getsignal(signum) is signal.SIG_DFL  # what was there before comes back
    finally:
        signal.signal(signum, inherited)
    assert_one_line_error(result, "interrupted" if signum == signal.SIGINT else signal.Signals(signum).name,
                          status=status)
    assert not (tmp_path / "out.h5").exists()
    assert_no_temporary_files(tmp_path)


def test_an_ignored_hangup_stays_ignored(run, tmp_path, monkeypatch):
    """`nohup caloadapt ...`: a closed terminal must not end the job."""
    import caloadapt.simulate as simulate_module

    original = simulate_module.iter_simulate

    def signalled(*args, **kwargs):
        for k, chunk in enumerate(original(*args, **kwargs)):
            yield chunk
            if k == 0:
                os.kill(os.getpid(), signal.SIGHUP)

    monkeypatch.setattr(simulate_module, "iter_simulate", signalled)
    monkeypatch.setattr("caloadapt.simulate.simulator.SPOTS_PER_CHUNK", 20_000)
    inherited = signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        result = run("simulate", "-o", "out.h5", "--n", "30", "--energy", "10:20")
        assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGHUP, inherited)
    assert result.exit_code == 0, result.output
    assert (tmp_path / "out.h5").exists()


def test_sigterm_during_training_leaves_a_resumable_checkpoint(run, ild_file, monkeypatch):
    from caloadapt.train import loop

    args = ["--data", ild_file, "--steps", "4", "--batch-size", "4", "--max-points", "32", "--val-every", "2",
            "--device", "cpu", *TINY_MODEL]
    assert run("train", "-o", "whole", *args).exit_code == 0
    original = loop._EMA.update

    def preempted(self, model, step, names):
        original(self, model, step, names)
        if step == 0:
            os.kill(os.getpid(), signal.SIGTERM)

    with monkeypatch.context() as patch:
        patch.setattr(loop._EMA, "update", preempted)
        result = run("train", "-o", "cut", *args)
    assert_one_line_error(result, "SIGTERM", "--resume", status=143)
    assert load_checkpoint("cut/last.pt")["train_state"]["step"] == 1
    resumed = run("train", "-o", "cut", "--resume", *args)
    assert resumed.exit_code == 0, resumed.stderr
    assert "from step 1 of 4" in resumed.stdout
    whole, cut = load_checkpoint("whole/last.pt"), load_checkpoint("cut/last.pt")
    for name, value in whole["model"].items():
        assert torch.equal(value, cut["model"][name]), name


# -- 6. bad input is one line, never a traceback ------------------------------------------------------------
def _corrupt_chunk(source: Path, target: Path) -> Path:
    target.write_bytes(source.read_bytes())
    with h5py.File(target) as f:
        offset = f["points"].id.get_chunk_info(0).byte_offset
    data = bytearray(target.read_bytes())
    for i in range(offset + 64, offset + 512):
        data[i] ^= 0x5A
    target.write_bytes(bytes(data))
    return target


@pytest.mark.parametrize("case", ["corrupt-chunk", "float-offsets", "string-offsets", "string-energies"])
def test_malformed_files_are_one_line(run, ild_file, tmp_path, case):
    with h5py.File(ild_file) as f:
        offsets, energies = f["offsets"][:], f["incident_energy_mev"][:]
    path = tmp_path / f"{case}.h5"
    if case == "corrupt-chunk":
        _corrupt_chunk(ild_file, path)
    elif case == "float-offsets":
        _copy_points_file(ild_file, path, offsets=offsets.astype(np.float64))
    elif case == "string-offsets":
        _copy_points_file(ild_file, path, offsets=offsets.astype("S8"))
    else:
        _copy_points_file(ild_file, path, incident_energy_mev=energies.astype("S12"))
    assert_one_line_error(run("info", path), path.name)
    assert_one_line_error(run("convert", path, "out.h5"), path.name)
    assert not (tmp_path / "out.h5").exists()
    assert_no_temporary_files(tmp_path)


@pytest.mark.parametrize("args, words", [
    (["simulate", "--seed", "-1"], ["--seed"]),
    (["simulate", "--seed", str(2**64)], ["--seed"]),
    (["simulate", "--n", "0"], ["--n"]),
    (["simulate", "--n", "1e12"], ["--n"]),
    (["simulate", "--n", str(10**12)], ["memory"]),
    (["simulate", "--energy", "1e9"], ["memory", "GeV"]),
    (["simulate", "--format", "xml"], ["--format"]),
    (["generate", "-g", "ild-ecal", "--device", "tpu"], ["tpu"]),
    (["generate", "-g", "ild-ecal", "--device", "cpu", "--sigma-max", "1e300"], ["sigma_max", "float32"]),
])
def test_bad_numbers_and_names_are_one_line(run, tmp_path, args, words):
    assert_one_line_error(run(*args, "-o", "out.h5"), *words)
    assert not (tmp_path / "out.h5").exists()
    assert_no_temporary_files(tmp_path)


@pytest.mark.parametrize("option, value", [("--lr", "nan"), ("--lr", "-1"), ("--flow-lr", "inf"),
                                           ("--val-fraction", "1"), ("--device", "tpu"), ("--seed", "-1"),
                                           ("--widths", "0,-3"), ("--transverse-scale-rm", "nan"),
                                           ("--transverse-scale-rm", "-1")])
def test_bad_training_options_are_one_line(run, ild_file, tmp_path, option, value):
    args = [*TINY_RUN]
    if option in args:
        i = args.index(option)
        del args[i:i + 2]
    line = assert_one_line_error(run("train", "--data", ild_file, "-o", "run", *args, option, value),
                                 option.lstrip("-")[:5])
    assert "unexpected" not in line
    assert not (tmp_path / "run" / "last.pt").exists()


def _broken_checkpoint(good: Path, target: Path, case: str) -> Path:
    payload = torch.load(good, weights_only=True)
    if case == "model-config-type":
        payload["model_config"] = {**payload["model_config"], "widths": "wide"}
    elif case == "model-config-key":
        payload["model_config"] = {**payload["model_config"], "colour": "red"}
    elif case == "shapes":
        payload["model"] = payload["ema"] = {k: torch.zeros(3) for k in payload["model"]}
    elif case == "nan-weights":
        payload["ema"] = {k: torch.full_like(v, float("nan")) if v.is_floating_point() else v
                          for k, v in payload["ema"].items()}
    torch.save(payload, target)
    return target


@pytest.mark.parametrize("case, words", [("model-config-type", ["model configuration"]),
                                         ("model-config-key", ["colour"]),
                                         ("shapes", ["shape"]),
                                         ("nan-weights", ["NaN"])])
@pytest.mark.parametrize("command", ["generate", "export"])
def test_broken_checkpoints_are_one_line(run, tiny_run, tmp_path, case, words, command):
    broken = _broken_checkpoint(tiny_run / "best.pt", tmp_path / "broken.pt", case)
    args = (["generate", "-g", "ild-ecal", "--n", "2", "--device", "cpu", "--steps", "1"] if command == "generate"
            else ["export"])
    assert_one_line_error(run(*args, "--checkpoint", broken, "-o", "out.h5"), "broken.pt", *words)
    assert not (tmp_path / "out.h5").exists()
    assert_no_temporary_files(tmp_path)


def test_resuming_a_run_as_another_backbone_is_one_line(run, ild_file):
    assert run("train", "--data", ild_file, "-o", "run", *TINY_RUN).exit_code == 0
    result = run("train", "--data", ild_file, "-o", "run", "--resume", *TINY_RUN, "--backbone", "transformer")
    assert_one_line_error(result, "last.pt", "backbone")


def test_evaluate_of_showers_without_hits_is_one_line(run, ild_file, tmp_path):
    empty = _copy_points_file(ild_file, tmp_path / "empty.h5", points=np.zeros((0, 4), np.float32),
                              offsets=np.zeros(13, np.int64))
    result = run("evaluate", "--generated", empty, "--reference", ild_file, "-o", "results", "--classifier", "none",
                 "--no-plots", "--n-bootstrap", "0", "--no-fpd-kpd")
    assert_one_line_error(result, "empty.h5", "zero hits")


def test_unexpected_errors_are_one_line_pointing_to_debug(run, monkeypatch):
    def broken(*args, **kwargs):
        raise ZeroDivisionError("division by zero somewhere deep")

    monkeypatch.setattr("caloadapt.geometry.get_geometry", broken)
    line = assert_one_line_error(run("simulate", "-o", "out.h5", "--n", "2"), "ZeroDivisionError", "--debug")
    assert "somewhere deep" in line
    debug = run("--debug", "simulate", "-o", "out.h5", "--n", "2")
    assert debug.exit_code == 2 and "Traceback" in debug.stderr and "ZeroDivisionError" in debug.stderr


def test_help_still_works(run):
    result = run("--help")
    assert result.exit_code == 0 and "simulate" in result.stdout
    assert run("simulate", "--help").exit_code == 0


# -- 7. garbage is refused, not accepted ----------------------------------------------------------------------
def test_nan_coordinates_are_refused(run, ild_file, tmp_path):
    with h5py.File(ild_file) as f:
        points = f["points"][:]
    points[5, 1] = np.nan
    bad = _copy_points_file(ild_file, tmp_path / "nan.h5", points=points)
    assert_one_line_error(run("info", bad), "nan.h5", "coordinates")
    with pytest.raises(caloadapt.errors.InputError, match="coordinates"):
        read_showers(bad)


def test_training_on_showers_without_hits_is_refused(run, ild_file, tmp_path):
    empty = _copy_points_file(ild_file, tmp_path / "empty.h5", points=np.zeros((0, 4), np.float32),
                              offsets=np.zeros(13, np.int64))
    assert_one_line_error(run("train", "--data", empty, "-o", "run", *TINY_RUN), "empty.h5", "no hits")
    assert not (tmp_path / "run" / "last.pt").exists()


def test_evaluate_refuses_files_of_two_detectors(run, ild_file, tmp_path):
    assert run("simulate", "-o", "ds2.h5", "-g", "calochallenge-2", "-f", "calochallenge", "--n", "3",
               "--energy", "1:3").exit_code == 0
    result = run("evaluate", "--generated", "ds2.h5", "--reference", ild_file, "-o", "results",
                 "--classifier", "none", "--no-plots", "--n-bootstrap", "0")
    assert_one_line_error(result, "calochallenge-2", "ild-ecal", "--geometry")
    assert not (tmp_path / "results").exists()


# -- 8. run folders ---------------------------------------------------------------------------------------------
def test_training_into_a_finished_run_needs_resume_or_overwrite(run, ild_file, tmp_path):
    assert run("train", "--data", ild_file, "-o", "run", *TINY_RUN).exit_code == 0
    before = (tmp_path / "run" / "last.pt").read_bytes()
    assert_one_line_error(run("train", "--data", ild_file, "-o", "run", *TINY_RUN), "--resume", "--overwrite")
    assert (tmp_path / "run" / "last.pt").read_bytes() == before
    again = run("train", "--data", ild_file, "-o", "run", "--overwrite", *TINY_RUN, "--seed", "5")
    assert again.exit_code == 0, again.stderr
    assert (tmp_path / "run" / "last.pt").read_bytes() != before


def test_resume_without_a_checkpoint_is_refused(run, ild_file, tmp_path):
    (tmp_path / "run").mkdir()
    assert_one_line_error(run("train", "--data", ild_file, "-o", "run", "--resume", *TINY_RUN), "nothing to resume")
    assert not (tmp_path / "run" / "last.pt").exists()


def test_a_run_folder_in_use_is_refused(run, ild_file, tmp_path):
    from caloadapt.train.rundir import LOCK_NAME

    (tmp_path / "run").mkdir()
    fd = os.open(tmp_path / "run" / LOCK_NAME, os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # as another training process would
        assert_one_line_error(run("train", "--data", ild_file, "-o", "run", *TINY_RUN), "another caloadapt run")
        assert not (tmp_path / "run" / "metrics.csv").exists()
    finally:
        os.close(fd)
    assert run("train", "--data", ild_file, "-o", "run", *TINY_RUN).exit_code == 0


# -- 9. messages say what is wrong ----------------------------------------------------------------------------
def test_negative_slab_thickness_is_reported_as_such(run, tmp_path):
    from caloadapt.geometry.spec import __file__ as spec_file

    text = (Path(spec_file).parent / "data" / "pb-lar.yaml").read_text()
    (tmp_path / "negative.yaml").write_text(re.sub(r"thickness_mm: 1\.5", "thickness_mm: -1.5", text))
    line = assert_one_line_error(run("simulate", "-g", "negative.yaml", "-o", "out.h5", "--n", "2"), "thickness_mm")
    assert "material" not in line


def test_full_disk_writing_a_checkpoint_is_an_output_error(tiny_run, tmp_path, monkeypatch):
    from caloadapt.models.checkpoint import model_from_checkpoint, save_checkpoint

    model = model_from_checkpoint(tiny_run / "best.pt")

    def full(*args, **kwargs):  # what torch's writer raises when the disk is full
        raise RuntimeError("[enforce fail at inline_container.cc:783] . PytorchStreamWriter failed writing file "
                           "data/0: file write failed")

    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(OutputError, match="out.pt: cannot write the checkpoint"):
        save_checkpoint(tmp_path / "out.pt", model)
    assert not (tmp_path / "out.pt").exists()
    assert_no_temporary_files(tmp_path)


# -- 10. inputs are checked where they enter ------------------------------------------------------------------
@pytest.fixture
def fifo(tmp_path):
    """A FIFO whose writer opens it once a reader waits (then closes it at once), until the test ends:
    a reader that does not refuse it gets an empty file instead of waiting for ever."""
    path = tmp_path / "fifo.yaml"
    os.mkfifo(path)
    done = threading.Event()

    def writer():
        while not done.wait(0.05):
            try:
                os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))
            except OSError:  # no reader yet
                continue

    thread = threading.Thread(target=writer, daemon=True)
    thread.start()
    yield path
    done.set()
    thread.join()


def test_files_of_the_wrong_kind_are_named(run, tiny_run, ild_file, tmp_path, fifo):
    (tmp_path / "binary.yaml").write_bytes(ild_file.read_bytes())
    generate = ["generate", "-g", "ild-ecal", "--n", "2", "--device", "cpu", "--steps", "1", "-o", "out.h5"]
    assert_one_line_error(run(*generate, "--checkpoint", ild_file), "ild.h5", "HDF5", "not a checkpoint")
    assert_one_line_error(run(*generate, "--checkpoint", tiny_run / "best.pt", "--engine", "onnxruntime",
                              "--onnx", ild_file), "ild.h5", "HDF5", "not an ONNX file")
    assert_one_line_error(run("info", tiny_run / "best.pt"), "best.pt", "PyTorch checkpoint", "not a shower file")
    assert_one_line_error(run("simulate", "-g", "binary.yaml", "-o", "out.h5", "--n", "2"), "binary.yaml",
                          "HDF5", "not a geometry file")
    assert_one_line_error(run("simulate", "-g", fifo, "-o", "out.h5", "--n", "2"), "fifo.yaml", "FIFO")
    assert_one_line_error(run("info", fifo), "fifo.yaml", "FIFO")
    assert not (tmp_path / "out.h5").exists()


def test_an_empty_path_is_refused(run, ild_file, tmp_path):
    """'' would be the current folder: a training would fill it with its files."""
    assert_one_line_error(run("train", "--data", ild_file, "-o", "", *TINY_RUN), "empty", "-o")
    assert_one_line_error(run("info", ""), "empty")
    assert not (tmp_path / "metrics.csv").exists()


# -- 11. geometry descriptions: finite numbers, sizes that can be built ------------------------------------
def _builtin_description(name: str) -> str:
    from caloadapt.geometry.spec import __file__ as spec_file

    return (Path(spec_file).parent / "data" / f"{name}.yaml").read_text()


@pytest.mark.parametrize("old, new, words", [
    ("thickness_mm: 1.4", "thickness_mm: .inf", ["thickness_mm", "finite"]),
    ("n_r: 18, dr_moliere: 0.25", "r_edges_mm: [0, 1, .nan, 3]", ["r_edges_mm", "finite"]),
    ("threshold_mev: 0.015151515151515152", "threshold_mev: .nan", ["threshold_mev", "finite"]),
    ("repeat: 90", "repeat: 1000000000000", ["slabs", "repeat"]),
    ("n_layers: 45", "n_layers: 1000000000", ["layers", "10,000"]),
    ("n_r: 18, dr_moliere: 0.25, n_alpha: 50", "n_r: 100000, dr_moliere: 0.25, n_alpha: 100000", ["cells"]),
    ("n_r: 18, dr_moliere: 0.25, n_alpha: 50", "layers: [{r_edges_mm: [0, 1]}]", ["n_alpha"]),
])
def test_geometry_descriptions_with_unusable_numbers_are_refused(run, tmp_path, old, new, words):
    text = _builtin_description("generic-mesh")
    assert old in text
    (tmp_path / "bad.yaml").write_text(text.replace(old, new))
    assert_one_line_error(run("simulate", "-g", "bad.yaml", "-o", "out.h5", "--n", "1"), "bad.yaml", *words)
    assert not (tmp_path / "out.h5").exists()


def test_binning_xml_with_non_finite_edges_is_refused(run, tmp_path):
    layers = "".join(f'<Layer id="{i}" r_edges="0,4,nan,20" n_bin_alpha="10"/>' for i in range(3))
    (tmp_path / "nan.xml").write_text(f'<Bins><Bin pid="22" name="photon">{layers}</Bin></Bins>')
    assert_one_line_error(run("simulate", "-g", "nan.xml", "-o", "out.h5", "--n", "1"), "nan.xml", "finite")
    assert not (tmp_path / "out.h5").exists()


def test_geometry_descriptions_that_alias_their_way_to_millions_of_slabs_are_refused():
    """YAML aliases make one object stand for many: counted as used, before anything is built from them."""
    from caloadapt.errors import GeometryError
    from caloadapt.geometry import geometry_from_spec

    data = yaml.safe_load(_builtin_description("generic-mesh"))
    block = {"repeat": 1, "slabs": [{"material": "W", "thickness_mm": 0.001, "active": True}]}
    for _ in range(6):  # 10**6 slabs from a few dozen objects
        block = {"repeat": 1, "slabs": [block] * 10}
    data["stack"] = [block]
    with pytest.raises(GeometryError, match="entries"):
        geometry_from_spec(data, source="aliases.yaml")


# -- 12. failed runs and killed writers leave nothing in the way ---------------------------------------------
def test_a_run_that_fails_before_its_first_checkpoint_leaves_nothing(run, ild_file, tmp_path):
    """The same command, corrected, runs again: no 'holds a run already' for a run that never was."""
    failed = run("train", "--data", ild_file, "-o", "run", *TINY_RUN, "--lr", "1e30")
    assert_one_line_error(failed, "non-finite")
    assert not (tmp_path / "run").exists()
    again = run("train", "--data", ild_file, "-o", "run", *TINY_RUN)
    assert again.exit_code == 0, again.stderr
    (tmp_path / "kept").mkdir()  # a folder the user made stays, and so does what else is in it
    (tmp_path / "kept" / "notes.txt").write_text("mine")
    assert_one_line_error(run("train", "--data", ild_file, "-o", "kept", *TINY_RUN, "--lr", "1e30"), "non-finite")
    assert sorted(p.name for p in (tmp_path / "kept").iterdir() if p.name != ".caloadapt.lock") == ["notes.txt"]


def test_the_files_of_a_run_killed_before_its_first_checkpoint_are_replaced(run, ild_file, tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.csv").write_text("step,epoch\n")  # what kill -9 at step 10 of 200 leaves
    result = run("train", "--data", ild_file, "-o", "run", *TINY_RUN)
    assert result.exit_code == 0, result.stderr
    assert "wrote no checkpoint" in result.stdout and (tmp_path / "run" / "last.pt").is_file()


def test_stale_temporary_files_are_swept_and_live_ones_kept(run, tmp_path):
    from caloadapt._atomic import STALE_AFTER_S

    def temporary(name: str, age_s: float) -> Path:
        path = tmp_path / name
        path.write_bytes(b"partial")
        old = path.stat().st_mtime - age_s
        os.utime(path, (old, old))
        return path

    stale = temporary(".out.h5.caloadapt-dead0001.tmp", 2 * STALE_AFTER_S)  # its writer was killed
    live = temporary(".other.h5.caloadapt-live0001.tmp", 2 * STALE_AFTER_S)  # a long write in progress
    fresh = temporary(".other.h5.caloadapt-new00001.tmp", 0)  # just created, not yet locked
    foreign = temporary(".notes.txt.swp.tmp", 2 * STALE_AFTER_S)  # not caloadapt's
    fd = os.open(live, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # as its writer holds it
        assert run("simulate", "-o", "out.h5", "--n", "2", "--energy", "1:2").exit_code == 0
        assert not stale.exists()
        assert live.exists() and fresh.exists() and foreign.exists()
    finally:
        os.close(fd)


# -- 13. a diverging training stops, keeping its last checkpoint before -------------------------------------
def _tiny_training(ild_file, out: Path, objective, **overrides) -> dict:
    from caloadapt.geometry import get_geometry
    from caloadapt.models import ModelConfig, ShowerModel
    from caloadapt.train import TrainConfig, train

    config = TrainConfig(**{**dict(steps=40, batch_size=4, max_points=32, val_every=10, checkpoint_every=10,
                                   device="cpu", val_max_showers=4, occupancy_showers=0), **overrides})
    torch.manual_seed(0)
    model = ShowerModel(ModelConfig(widths=(16, 16), time_dim=16, flow_hidden=(16,), flow_transforms=1))
    return train(model, ild_file, get_geometry("ild-ecal"), out, config, progress=False, objective=objective)


class _ExplodingLosses(ModelLosses):
    """The model's own losses, times ``factor`` from call ``start`` on: a run whose loss explodes."""

    def __init__(self, start: int, factor: float):
        self.start, self.factor, self.calls = start, factor, 0

    def losses(self, model, batch, generator):
        losses = super().losses(model, batch, generator)
        self.calls += 1
        return {k: v * self.factor for k, v in losses.items()} if self.calls > self.start else losses


def test_a_loss_that_explodes_stops_the_run_and_keeps_the_last_checkpoint(ild_file, tmp_path):
    from caloadapt.errors import TrainingError

    with pytest.raises(TrainingError, match=r"diverged at step 25: the diffusion loss rose.*last.pt holds step 20"):
        _tiny_training(ild_file, tmp_path / "run", _ExplodingLosses(start=25, factor=1e8))
    assert load_checkpoint(tmp_path / "run" / "last.pt")["train_state"]["step"] == 20
    assert load_checkpoint(tmp_path / "run" / "best.pt")["train_state"]["step"] == 20


def test_a_loss_that_only_wanders_does_not_stop_the_run(ild_file, tmp_path):
    summary = _tiny_training(ild_file, tmp_path / "run", _ExplodingLosses(start=25, factor=30.0))
    assert summary["steps"] == 40


# -- 14. memory: estimated before it is spent, and an out-of-memory line that names the cause -------------
def test_showers_that_would_not_fit_are_refused_with_a_count_that_fits(run, tmp_path, monkeypatch):
    monkeypatch.setattr("caloadapt._memory.available_memory_bytes", lambda: 64 * 2**20)
    for command in (["simulate"], ["generate", "-g", "ild-ecal", "--device", "cpu"]):
        line = assert_one_line_error(run(*command, "--n", "2000000", "-o", "out.h5"), "--n 2,000,000", "memory")
        assert re.search(r"about [\d,]+ showers would fit", line), line
    assert not (tmp_path / "out.h5").exists()


def test_a_generation_batch_that_would_not_fit_is_refused(run, tiny_run, tmp_path, monkeypatch):
    monkeypatch.setattr("caloadapt._memory.available_memory_bytes", lambda: 64 * 2**20)
    result = run("generate", "--checkpoint", tiny_run / "best.pt", "-g", "ild-ecal", "--device", "cpu", "--steps", "1",
                 "--n", "5000", "--batch-size", "5000", "-o", "out.h5")
    line = assert_one_line_error(result, "5,000 showers", "--batch-size")
    assert re.search(r"about [\d,]+ showers per batch would fit", line), line
    assert not (tmp_path / "out.h5").exists()


def test_a_training_step_that_would_not_fit_is_refused_before_the_run_starts(run, ild_file, tmp_path, monkeypatch):
    monkeypatch.setattr("caloadapt._memory.available_memory_bytes", lambda: 64 * 2**20)
    args = [a for a in TINY_RUN]
    args[args.index("--batch-size") + 1] = "100000"
    line = assert_one_line_error(run("train", "--data", ild_file, "-o", "run", *args), "100,000 showers",
                                 "--batch-size")
    assert re.search(r"about [\d,]+ showers per step would fit", line), line
    assert not (tmp_path / "run").exists()


def test_evaluating_in_a_readout_too_large_for_the_memory_is_refused_up_front(run, ild_file, tmp_path, monkeypatch):
    monkeypatch.setattr("caloadapt._memory.available_memory_bytes", lambda: 64 * 2**20)
    result = run("evaluate", "--generated", ild_file, "--reference", ild_file, "-o", "results", "--classifier", "none",
                 "--no-plots", "--n-bootstrap", "0")
    assert_one_line_error(result, "ild-ecal", "187,230 cells", "--geometry")
    assert not (tmp_path / "results").exists()


def test_out_of_memory_names_what_sizes_the_command(run, ild_file, tmp_path, monkeypatch):
    def exhausted(*args, **kwargs):
        raise MemoryError

    monkeypatch.setattr("caloadapt.data.iter_showers", exhausted)
    line = assert_one_line_error(run("convert", ild_file, "out.h5"), "out of memory", "convert", "--chunk-size")
    assert "--n" not in line and "--batch-size" not in line


# -- 15. an output that is an input of the same command ----------------------------------------------------
def test_outputs_that_are_inputs_of_the_same_command_are_refused(run, tiny_run, ild_file, tmp_path):
    model = tmp_path / "model.pt"
    shutil.copy(tiny_run / "best.pt", model)
    before = model.read_bytes()
    assert_one_line_error(run("export", "--checkpoint", model, "-o", model), "model.pt", "--checkpoint")
    assert_one_line_error(run("calibrate", "--checkpoint", model, "--data", ild_file, "-o", model, "--device", "cpu"),
                          "model.pt", "--checkpoint")
    assert_one_line_error(run("generate", "--checkpoint", model, "-g", "ild-ecal", "--n", "2", "--device", "cpu",
                              "-o", model), "model.pt", "--checkpoint")
    assert model.read_bytes() == before


def test_a_run_that_would_write_over_its_own_input_is_refused(run, tiny_run, ild_file, tmp_path):
    """Fine-tuning again from a run's best.pt into that run: --overwrite would remove the model it starts from."""
    shutil.copytree(tiny_run, tmp_path / "run")
    before = (tmp_path / "run" / "best.pt").read_bytes()
    result = run("finetune", "--checkpoint", "run/best.pt", "--data", ild_file, "-o", "run", "--overwrite",
                 "--steps", "1", "--device", "cpu", "--occupancy-showers", "0")
    assert_one_line_error(result, "best.pt", "choose another -o")
    assert (tmp_path / "run" / "best.pt").read_bytes() == before


def test_generating_through_onnxruntime_leaves_no_temporary_export(run, tiny_run, tmp_path, monkeypatch):
    import tempfile

    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    result = run("generate", "--checkpoint", tiny_run / "best.pt", "-g", "ild-ecal", "--n", "2", "--device", "cpu",
                 "--steps", "1", "--engine", "onnxruntime", "-o", "out.h5")
    assert result.exit_code == 0, result.stderr
    assert list(scratch.iterdir()) == []
