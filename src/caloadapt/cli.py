"""The ``caloadapt`` command line: a thin layer over the pipeline stages.

Energies on the command line are in GeV; files hold the units their format prescribes.
Errors caused by the input are printed as one line (``caloadapt: error: ...``), exit status 2.
"""

from __future__ import annotations

import dataclasses
import errno
import functools
import json
import os
import sys
import traceback
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

from ._threads import configure_thread_environment

configure_thread_environment()  # before numpy and torch load OpenMP, which reads it once (docs/threads.md)

import numpy as np
import torch
import typer
from typer.core import TyperGroup
from typer.exceptions import Abort as UsageAbort
from typer.exceptions import TyperException as UsageException

from ._signals import Terminated, termination_handlers
from .errors import CaloadaptError
from .models.sampling import DEFAULT_STEPS, SAMPLER_KINDS, Sampler

#: ``caloadapt --debug COMMAND`` (or CALOADAPT_DEBUG=1): show the traceback of an error
_debug = False
#: the command being run (its out-of-memory line names what sizes its memory)
_command: str | None = None


class _OneLineErrorGroup(TyperGroup):
    """The command group; whatever goes wrong ends as one line on stderr.

    User errors (:class:`CaloadaptError`, bad option values, write errors) exit with status 2;
    SIGINT / SIGTERM / SIGHUP with 130 / 143 / 129 after the outputs in progress are removed; an
    unexpected exception is one line too (status 2) that points to ``--debug`` for the traceback.
    """

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        global _debug, _command
        _debug = os.environ.get("CALOADAPT_DEBUG", "") not in ("", "0")
        args = sys.argv[1:] if args is None else list(args)
        _command = next((arg for arg in args if not arg.startswith("-")), None)  # --debug is the only option before it
        try:
            _refuse_empty_arguments(args)
            with termination_handlers():
                status = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
            status = status if isinstance(status, int) else 0
        except BaseException as err:  # noqa: BLE001: the last-resort handler of the command line
            status = _report(err)
        if not standalone_mode:
            return status
        sys.exit(status)


def _refuse_empty_arguments(args: list[str]) -> None:
    """An empty argument is never meant: as a path it would be the current folder (``-o ''`` trains there)."""
    for i, arg in enumerate(args):
        if arg.startswith("--") and arg.endswith("="):  # --output=
            raise CaloadaptError(f"empty value given to {arg[:-1]}")
        if arg == "":
            option = args[i - 1] if i > 0 and args[i - 1].startswith("-") else None
            raise CaloadaptError(f"empty value given to {option}" if option else "an empty argument was given")


def _one_line(text: str) -> str:
    return "; ".join(line.strip() for line in str(text).splitlines() if line.strip())


def _error(message: str, status: int = 2) -> int:
    typer.echo(f"caloadapt: error: {_one_line(message)}", err=True)
    return status


def _report(err: BaseException) -> int:
    """Print ``err`` as one line (and its traceback with --debug); the exit status."""
    if isinstance(err, SystemExit):
        return err.code if isinstance(err.code, int) else (0 if err.code is None else _error(str(err.code)))
    if isinstance(err, typer.Exit):
        return err.exit_code
    if _debug and not isinstance(err, (UsageException, UsageAbort)):
        traceback.print_exception(err)
    if isinstance(err, UsageException):  # a bad option value, a missing argument, an unknown command
        ctx = getattr(err, "ctx", None)
        command = ctx.command_path if ctx is not None else "caloadapt"
        return _error(f"{err.format_message()} (see '{command} --help')")
    if isinstance(err, CaloadaptError):
        return _error(str(err))
    if isinstance(err, Terminated):
        return _error(f"{err}; {err.note or 'no partial output was kept'}", err.exit_status)
    if isinstance(err, (KeyboardInterrupt, UsageAbort)):
        return _error("interrupted; no partial output was kept", 130)
    if isinstance(err, OSError) and err.errno == errno.EPIPE:
        return 1  # the reader of our output went away (e.g. '| head'): nothing to say
    if isinstance(err, OSError) and err.strerror:
        where = f"{err.filename}: " if err.filename else ""
        if isinstance(err, FileExistsError):
            return _error(f"{where}exists already and is not what is needed here (a folder?)")
        return _error(f"{where}{err.strerror}")
    if _is_out_of_memory(err):
        return _error(_out_of_memory_line(_command))
    hint = "" if _debug else "; rerun as 'caloadapt --debug ...' to see the traceback"
    return _error(f"unexpected {type(err).__name__}: {_one_line(err) or 'no message'} (a bug of caloadapt?){hint}")


app = typer.Typer(cls=_OneLineErrorGroup, add_completion=False, no_args_is_help=True,
                  help="Fast calorimeter shower simulation with cross-geometry transfer learning.")


@app.callback()
def _options(debug: Annotated[bool, typer.Option("--debug", help="show the traceback of an error (also "
                                                                  "CALOADAPT_DEBUG=1)")] = False) -> None:
    global _debug
    _debug = _debug or debug


class OutputFormat(str, Enum):
    points = "points"
    ild = "ild"
    calochallenge = "calochallenge"


class Spectrum(str, Enum):
    fixed = "fixed"
    uniform = "uniform"
    log_uniform = "log-uniform"
    list = "list"


class Level(str, Enum):
    hits = "hits"
    spots = "spots"


#: the options that size what each command holds in memory (besides the geometry's cells), for its
#: out-of-memory line
_MEMORY_OPTIONS = {
    "simulate": "--n, --energy", "generate": "--batch-size, --n", "convert": "--chunk-size",
    "evaluate": "--max-showers", "calibrate": "--n-showers",
    **dict.fromkeys(("pretrain", "train", "finetune", "distill", "train-flow"), "--batch-size, --max-points"),
    "sweep": "--batch-size, --max-points, --n-eval",
}


def _is_out_of_memory(err: BaseException) -> bool:
    return isinstance(err, MemoryError) or (isinstance(err, RuntimeError) and any(
        text in str(err) for text in ("can't allocate memory", "out of memory", "CUDA out of memory")))


def _out_of_memory_line(command: str | None) -> str:
    """The out-of-memory line: what sizes the memory of ``command``, and nothing it does not have."""
    if command is None:
        return "out of memory"
    options = _MEMORY_OPTIONS.get(command)
    sizes = f"lower {options} or use a readout with fewer cells" if options else "its inputs are too large"
    return f"out of memory in '{command}': {sizes}"


def _one_line_errors(command):
    """Turn user-input errors into one line on stderr and exit status 2 (the command group handles the rest)."""
    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except (CaloadaptError, KeyboardInterrupt) as err:  # typer would turn Ctrl-C into a silent exit
            raise typer.Exit(_report(err)) from None
    return wrapper


#: seeds are 32-bit unsigned integers (NumPy and torch take them all)
MAX_SEED = 2**32 - 1

GeometryOption = Annotated[str, typer.Option("--geometry", "-g",
                                             help="built-in name (ild-ecal, calochallenge-2, calochallenge-3, "
                                                  "generic-mesh) or a .yaml / binning .xml file")]


ThreadsOption = Annotated[Optional[str], typer.Option(
    help="CPU threads: a positive integer, or auto: the cores this process may use, shared with the other "
         "caloadapt processes running and no more than the load leaves free (docs/threads.md) [default: "
         "OMP_NUM_THREADS when set, else auto]", show_default=False)]


def _use_threads(threads: str | None) -> int:
    """Apply ``--threads`` (or the start-up choice) to torch and BLAS before the command's work; the
    user's OMP_NUM_THREADS counts unless ``--threads`` is given, ``auto`` included."""
    from ._threads import apply_threads, parse_threads

    return apply_threads(parse_threads(threads), respect_omp_num_threads=threads is None)


def _refuse_output_as_input(output: Path, source: Path | None, what: str = "the input") -> None:
    """One line, before anything is written, for an output that is also a file the command reads."""
    if source is not None and Path(output).resolve() == Path(source).resolve():
        raise CaloadaptError(f"{output}: output would overwrite {what}")


def _file_incidence(path: Path, n: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Incident energies (MeV) and incidence angles (degrees) of the first ``n`` (None: all) showers of a file."""
    from .data.io import iter_showers

    chunks = list(iter_showers(path, chunk_size=10_000, stop=n))
    return tuple(np.concatenate([getattr(c, key) for c in chunks]) if chunks else np.zeros(0)
                 for key in ("incident_energy_mev", "theta_deg", "phi_deg"))


def _incidence_angles(n: int, theta: str | None, phi: str | None, seed: int, geo, incoming=None
                      ) -> tuple[np.ndarray, np.ndarray]:
    """Checked incidence angles of ``n`` showers: drawn from ``--theta`` / ``--phi`` when given, else
    those of the ``--energies-from`` showers (``incoming``: their theta and phi; a floor sample or a
    generation for a file's showers is for the same particles), else normal incidence."""
    from .incidence import NORMAL_PHI_DEG, NORMAL_THETA_DEG, check_angles
    from .simulate import sample_angles_deg

    # the angles have their own random stream, so asking for them never changes the energies
    rng = np.random.default_rng([seed, 1])
    angles = []
    for name, text, normal, index in (("theta", theta, NORMAL_THETA_DEG, 0), ("phi", phi, NORMAL_PHI_DEG, 1)):
        if text is not None:
            angles.append(sample_angles_deg(n, text, name, rng))
        else:
            angles.append(incoming[index][:n] if incoming is not None else np.full(n, normal))
    return check_angles(*angles, geo.barrel_sides)


@app.command()
@_one_line_errors
def simulate(
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="output shower file")] = None,
    geometry: GeometryOption = "ild-ecal",
    particle: Annotated[Optional[str], typer.Option(help="photon, electron or positron "
                                                         "[default: the geometry's particle]")] = None,
    energy: Annotated[str, typer.Option(help="GeV: 50, a range 10:90 or a list 10,50,90")] = "10:90",
    spectrum: Annotated[Spectrum, typer.Option(help="incident-energy spectrum")] = Spectrum.uniform,
    n: Annotated[int, typer.Option("--n", "-n", min=1, help="number of showers")] = 1000,
    seed: Annotated[int, typer.Option(help="random seed (energies and showers)", min=0, max=MAX_SEED)] = 1,
    format: Annotated[OutputFormat, typer.Option("--format", "-f", help="output file layout")] = OutputFormat.points,
    level: Annotated[Level, typer.Option(help="hits (digitised cells) or spots (energy depositions)")] = Level.hits,
    mode: Annotated[str, typer.Option(help="simulator mode: B (granular Si readout) or A (GFlash spots)")] = "B",
    energies_from: Annotated[Optional[Path], typer.Option(help="take the incident energies of the first --n showers "
                                                               "of this file instead of drawing them (e.g. a floor "
                                                               "sample at the reference energies; use another "
                                                               "--seed than the file's), and their incidence angles "
                                                               "unless --theta / --phi are given")] = None,
    theta: Annotated[Optional[str], typer.Option(help="polar angle to the beam axis, degrees: 90 (normal incidence), "
                                                      "a uniform range 40:140 or a list 50,90,130 "
                                                      "(docs/inclined.md); default 90")] = None,
    phi: Annotated[Optional[str], typer.Option(help="azimuth around the beam axis, degrees: 90 (normal incidence), "
                                                    "a uniform range 0:360 or a list; default 90")] = None,
    validate: Annotated[bool, typer.Option("--validate", help="run the physics validation table instead")] = False,
    validate_n: Annotated[int, typer.Option(min=1, help="showers per point of the validation table")] = 400,
    threads: ThreadsOption = None,
) -> None:
    """Simulate showers with the embedded GFlash simulator and write them to a file."""
    _use_threads(threads)
    from .data import ShowerWriter
    from .geometry import get_geometry
    from .simulate import SimulationSettings, iter_simulate, parse_energy_range, sample_incident_energies

    if validate:
        from .simulate.validate import format_table, validation_table
        rows = validation_table(n_showers=validate_n, seed=seed, progress=True)
        typer.echo(format_table(rows))
        if output is not None:
            from ._atomic import atomic_path
            with atomic_path(output) as tmp:
                tmp.write_text(json.dumps([r._asdict() for r in rows], indent=2))
        return
    if output is None:
        raise CaloadaptError("missing --output / -o: where to write the showers")
    geo = get_geometry(geometry)
    particle = particle or geo.particle
    incoming = None
    if energies_from is not None:
        _refuse_output_as_input(output, energies_from, "the --energies-from file")
        energies, *incoming = _file_incidence(energies_from, n)
        if len(energies) < n:
            raise CaloadaptError(f"{energies_from}: holds {len(energies)} showers, fewer than --n {n}")
    else:
        energies = sample_incident_energies(n, parse_energy_range(energy), spectrum.value,
                                            np.random.default_rng(seed))
    theta_deg, phi_deg = _incidence_angles(n, theta, phi, seed, geo, incoming)
    settings = SimulationSettings(mode=mode)
    attrs = {"command": " ".join(sys.argv), "seed": seed, "simulator_mode": mode,
             **({"energies_from": str(energies_from)} if energies_from is not None
                else {"spectrum": spectrum.value})}
    with ShowerWriter(output, format.value if level == Level.hits else "points", geo, attrs) as writer:
        for chunk in iter_simulate(geo, particle, energies, theta_deg=theta_deg, phi_deg=phi_deg, seed=seed,
                                   level=level.value, settings=settings, progress=True):
            writer.append(chunk)
    typer.echo(f"wrote {n} {particle} showers in {geo.name} to {output} ({format.value})")


@app.command()
@_one_line_errors
def convert(
    input: Annotated[Path, typer.Argument(help="input shower file (any supported layout)")],
    output: Annotated[Path, typer.Argument(help="output shower file")],
    format: Annotated[OutputFormat, typer.Option("--format", "-f", help="output layout")] = OutputFormat.points,
    geometry: Annotated[Optional[str], typer.Option("--geometry", "-g",
                                                    help="geometry of the input (default: from the file)")] = None,
    smear: Annotated[bool, typer.Option(help="place points from voxels uniformly inside their cells")] = False,
    seed: Annotated[int, typer.Option(help="seed of the smearing", min=0, max=MAX_SEED)] = 1,
    chunk_size: Annotated[int, typer.Option(min=1, help="showers held in memory at once")] = 1000,
    threads: ThreadsOption = None,
) -> None:
    """Convert a shower file between the points, ILD and CaloChallenge layouts."""
    _use_threads(threads)
    from .data import ShowerWriter, iter_showers
    from .data.io import file_geometry

    _refuse_output_as_input(output, input)
    with ShowerWriter(output, format.value, file_geometry(input, geometry)) as writer:
        for chunk in iter_showers(input, geometry, chunk_size=chunk_size, smear=smear, seed=seed):
            writer.append(chunk)
    typer.echo(f"wrote {writer.n} showers to {output} ({format.value})")


class Listing(str, Enum):
    geometries = "geometries"
    models = "models"


@app.command("list")
@_one_line_errors
def list_builtins(
    what: Annotated[Listing, typer.Argument(help="geometries (built in, usable by name with -g) or models "
                                                 "(shipped, usable by name with --checkpoint)")],
) -> None:
    """List the built-in geometries or the shipped models."""
    if what == Listing.geometries:
        from .geometry import BUILTIN_GEOMETRIES, get_geometry

        typer.echo(f"{'geometry':<22} {'layers':>6} {'cells':>9} {'Moliere radius':>15}")
        for name in BUILTIN_GEOMETRIES:
            geometry = get_geometry(name)
            typer.echo(f"{name:<22} {geometry.n_layers:>6} {geometry.n_cells:>9,} "
                       f"{geometry.moliere_radius_mm:>12.1f} mm")
        return
    from .models.checkpoint import load_checkpoint, stored_sampler
    from .pretrained import SHIPPED_CHECKPOINTS, SHIPPED_STUDENTS, shipped_checkpoint

    typer.echo(f"{'model':<22} {'sampler':<16} {'one-step student':<20} calibrated for")
    for name in SHIPPED_CHECKPOINTS:
        payload = load_checkpoint(shipped_checkpoint(name))
        sampler = stored_sampler(payload, name)
        steps = "one step" if sampler.distilled else f"{sampler.steps} {sampler.kind} steps"
        calibrated = ", ".join(payload.get("occupancy") or {}) or "-"
        typer.echo(f"{name:<22} {steps:<16} {SHIPPED_STUDENTS.get(name, '-'):<20} {calibrated}")


@app.command()
@_one_line_errors
def info(
    file: Annotated[Path, typer.Argument(help="shower file")],
    geometry: Annotated[Optional[str], typer.Option("--geometry", "-g", help="geometry of the file")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
) -> None:
    """Show the format, geometry, counts, energy and angle ranges and points per shower of a file."""
    from .data import file_info

    summary = file_info(file, geometry)
    if as_json:
        typer.echo(json.dumps(summary, indent=2))
        return
    e_lo, e_hi = summary["incident_energy_gev"]
    pts = summary["points_per_shower"]
    typer.echo(f"{summary['path']}\n  format     {summary['format']}\n  geometry   {summary['geometry']}\n"
               f"  particle   {summary['particle']}\n  showers    {summary['showers']}\n"
               f"  energy     {e_lo:.4g} - {e_hi:.4g} GeV\n"
               f"  theta      {summary['theta_deg'][0]:.4g} - {summary['theta_deg'][1]:.4g} deg, "
               f"phi {summary['phi_deg'][0]:.4g} - {summary['phi_deg'][1]:.4g} deg (90, 90: normal incidence)\n"
               f"  points     min {pts['min']}, mean {pts['mean']:.1f}, max {pts['max']} per shower")


def _csv_ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(","))
    except ValueError:
        raise CaloadaptError(f"expected comma-separated integers, got {text!r}") from None


def _claim_run(output: Path, resume: bool, overwrite: bool, inputs=()) -> None:
    """Refuse a run folder that holds a run (unless --resume / --overwrite), or whose run files include one of
    the command's ``inputs`` (the run writes them, --overwrite removes them); say what will happen."""
    from .train.rundir import RUN_FILES, claim_run_directory

    written = [output / name for name in (*RUN_FILES, "model-1step.pt")]
    for source in inputs:
        if source is not None and Path(source).resolve() in {path.resolve() for path in written}:
            raise CaloadaptError(f"{source}: is an input of this run and a file the run writes (or --overwrite "
                                 f"removes) in {output}; copy it elsewhere or choose another -o")

    found = claim_run_directory(output, resume=resume, overwrite=overwrite)
    if not found.startswith("new run"):
        typer.echo(found)


OverwriteOption = Annotated[bool, typer.Option("--overwrite", help="replace the run already in the output folder "
                                                                   "(its checkpoints and metrics are removed)")]


def _run_training(data: list[Path], data_weight: list[float] | None, output: Path, geometry: str | None,
                  config, model_config, resume: bool, overwrite: bool = False) -> None:
    """Pre-training and training from scratch share this: a fresh model trained on one or more files."""
    from .data.io import file_geometry
    from .models import ShowerModel
    from .train import DataSource, train

    if geometry is not None and len(data) > 1:
        raise CaloadaptError("--geometry names the detector of a single file; joint training takes each "
                             "file's geometry from the file")
    weights = data_weight or [1.0] * len(data)
    if len(weights) != len(data):
        raise CaloadaptError(f"got {len(weights)} --data-weight values for {len(data)} --data files")
    sources = [DataSource(path, file_geometry(path, geometry), weight) for path, weight in zip(data, weights)]
    _claim_run(output, resume, overwrite, data)
    torch.manual_seed(config.seed)  # the initial weights are a function of --seed
    try:
        torch_model = ShowerModel(model_config)
    except ValueError as err:  # e.g. non-positive widths
        raise CaloadaptError(f"cannot build the model: {err}") from None
    summary = train(torch_model, sources, None, output, config, resume=resume,
                    checkpoint_parts={"command": " ".join(sys.argv)})
    if summary["rank"] != 0:  # one report (and one plot) per distributed training, from rank 0
        return
    from .evaluate.plots import loss_curves
    from .train.rundir import LOSS_CURVES, read_history
    loss_curves(read_history(output), output / LOSS_CURVES)
    typer.echo(f"trained {summary['steps']} steps in {summary['wall_s']:.0f} s; best validation: "
               f"diffusion {summary['best']['diffusion']:.4f} (step {summary['best_step']['diffusion']}), "
               f"flow {summary['best']['flow']:.4f} (step {summary['best_step']['flow']}); "
               f"checkpoints and {LOSS_CURVES} in {output}")


def _model_config(**options):
    """The model configuration of command-line options; what it refuses is one line."""
    from .models import ModelConfig

    try:
        return ModelConfig(**options)
    except ValueError as err:  # the configuration's own checks, e.g. a negative --transverse-scale-rm
        raise CaloadaptError(f"invalid model options: {err}") from None


def _training_command(name: str, help_text: str, default_steps: int, default_val_fraction: float):
    @app.command(name, help=help_text)
    @_one_line_errors
    def command(
        data: Annotated[list[Path], typer.Option("--data", help="training shower file; repeat it to train "
                                                               "jointly on several detectors")],
        output: Annotated[Path, typer.Option("--output", "-o", help="run directory")],
        data_weight: Annotated[Optional[list[float]], typer.Option(
            help="share of the batches from each --data file, in their order [default: equal]")] = None,
        geometry: Annotated[Optional[str], typer.Option("--geometry", "-g",
                                                        help="geometry of the data (default: from the file)")] = None,
        steps: Annotated[int, typer.Option(min=1, help="optimiser steps")] = default_steps,
        batch_size: Annotated[int, typer.Option(min=1, help="showers per step")] = 32,
        lr: Annotated[float, typer.Option(help="peak learning rate of the point network")] = 1e-3,
        flow_lr: Annotated[float, typer.Option(help="peak learning rate of the flow")] = 1e-3,
        max_points: Annotated[int, typer.Option(min=1, help="points per shower per step")] = 512,
        n_samples: Annotated[Optional[int], typer.Option(help="showers drawn from each file (default all)")] = None,
        val_fraction: Annotated[float, typer.Option(help="share held out for validation")] = default_val_fraction,
        val_every: Annotated[int, typer.Option(min=1, help="steps between validations/checkpoints")] = 200,
        seed: Annotated[int, typer.Option(help="seed of initialisation and training noise", min=0, max=MAX_SEED)] = 0,
        data_seed: Annotated[int, typer.Option(help="seed of the data subset and split", min=0, max=MAX_SEED)] = 0,
        device: Annotated[str, typer.Option(help="auto, cpu or cuda")] = "auto",
        resume: Annotated[bool, typer.Option("--resume", help="continue from the run's last checkpoint")] = False,
        overwrite: OverwriteOption = False,
        frame: Annotated[str, typer.Option(help="point frame: physical or box")] = "physical",
        transverse_scale_rm: Annotated[float, typer.Option(
            help="r0 of the radial compression r -> r0 asinh(r/r0) of the transverse position, in Moliere "
                 "radii (physical frame); 0: linear")] = 0.0,
        depth_given: Annotated[bool, typer.Option(
            "--depth-given/--depth-generated",
            help="generate each point in the layer the flow gives it (its depth a condition, only x, y and "
                 "energy diffused), or generate the depth too and sort points into layers")] = False,
        shower_depth_condition: Annotated[bool, typer.Option(
            "--shower-depth-condition/--no-shower-depth-condition",
            help="tell the point network each shower's longitudinal centre of gravity (from the flow's layer "
                 "energies), so the lateral width can follow the shower's own age")] = False,
        angle_conditioning: Annotated[bool, typer.Option(
            "--angle-conditioning/--no-angle-conditioning",
            help="tell the flow and the point network each shower's incidence direction (train on inclined "
                 "showers, caloadapt simulate --theta/--phi)")] = False,
        backbone: Annotated[str, typer.Option(help="point network: pointwise or transformer")] = "pointwise",
        geometry_conditioning: Annotated[Optional[bool], typer.Option(
            "--geometry-conditioning/--no-geometry-conditioning",
            help="condition on the detector descriptor [default: on when training on several detectors]")] = None,
        widths: Annotated[str, typer.Option(help="pointwise-network widths")] = "128,256,512,256,128",
        transformer_dim: Annotated[int, typer.Option(min=8, help="transformer width")] = 64,
        transformer_depth: Annotated[int, typer.Option(min=1, help="transformer blocks")] = 4,
        flow_hidden: Annotated[str, typer.Option(help="flow hyper-network widths")] = "128,128",
        flow_transforms: Annotated[int, typer.Option(min=1, help="flow coupling transforms")] = 6,
        patience: Annotated[Optional[int], typer.Option(help="early stop after N validations without gain")] = None,
        occupancy_showers: Annotated[int, typer.Option(min=0, help="training showers per detector the occupancy "
                                                                   "calibration is fitted on after training (0: none)")]
        = 128,
        threads: ThreadsOption = None,
    ) -> None:
        from .models import BACKBONES, FRAMES
        from .train import TrainConfig

        _use_threads(threads)
        if frame not in FRAMES:
            raise CaloadaptError(f"unknown frame {frame!r}; expected one of {', '.join(FRAMES)}")
        if backbone not in BACKBONES:
            raise CaloadaptError(f"unknown backbone {backbone!r}; expected one of {', '.join(BACKBONES)}")
        config = TrainConfig(steps=steps, batch_size=batch_size, lr=lr, flow_lr=flow_lr, max_points=max_points,
                             n_samples=n_samples, val_fraction=val_fraction, val_every=val_every,
                             checkpoint_every=val_every, seed=seed, data_seed=data_seed, device=device,
                             patience=patience, occupancy_showers=occupancy_showers)
        conditioned = len(data) > 1 if geometry_conditioning is None else geometry_conditioning
        model_config = _model_config(frame=frame, transverse_scale_rm=transverse_scale_rm,
                                     depth_given=depth_given, shower_depth_condition=shower_depth_condition,
                                     angle_conditioning=angle_conditioning, backbone=backbone,
                                     geometry_conditioning=conditioned, widths=_csv_ints(widths),
                                     transformer_dim=transformer_dim, transformer_depth=transformer_depth,
                                     flow_hidden=_csv_ints(flow_hidden), flow_transforms=flow_transforms)
        _run_training(data, data_weight, output, geometry, config, model_config, resume, overwrite)
    return command


pretrain = _training_command("pretrain", "Pre-train the shower model (flow + point diffusion) on a source detector.",
                             20000, 0.05)
train_scratch = _training_command("train", "Train the shower model from scratch (the baseline of adaptation).",
                                  2000, 0.2)


@app.command()
@_one_line_errors
def generate(
    output: Annotated[Path, typer.Option("--output", "-o", help="output shower file")],
    checkpoint: Annotated[Optional[Path], typer.Option(help="model checkpoint (default: the shipped "
                                                             "pre-trained model)")] = None,
    geometry: GeometryOption = "calochallenge-3",
    particle: Annotated[Optional[str], typer.Option(help="particle recorded in the file "
                                                         "[default: the geometry's]")] = None,
    n: Annotated[Optional[int], typer.Option("--n", "-n", min=1, help="number of showers [default: 1000; with "
                                                                      "--energies-from: all of the file's]",
                                             show_default=False)] = None,
    energy: Annotated[str, typer.Option(help="GeV: 50, a range 1:1000 or a list")] = "1:1000",
    spectrum: Annotated[Spectrum, typer.Option(help="incident-energy spectrum")] = Spectrum.log_uniform,
    energies_from: Annotated[Optional[Path], typer.Option(help="take the incident energies of this shower file "
                                                                "(its first --n showers; e.g. the evaluation "
                                                                "reference), and its "
                                                                "incidence angles unless --theta / --phi are "
                                                                "given")] = None,
    theta: Annotated[Optional[str], typer.Option(help="polar angle to the beam axis, degrees, as for simulate "
                                                      "(a model trained with --angle-conditioning); default 90")] = None,
    phi: Annotated[Optional[str], typer.Option(help="azimuth around the beam axis, degrees, as for simulate; "
                                                    "default 90")] = None,
    steps: Annotated[Optional[int], typer.Option(min=1, max=10_000, help="sampler steps [default: the checkpoint's: "
                                                             "1 for a distilled model]")] = None,
    sigma_max: Annotated[Optional[float], typer.Option(help="noise level the sampler starts from "
                                                            "[default: the checkpoint's]")] = None,
    sampler: Annotated[str, typer.Option(help="auto, heun, euler or consistency (auto: consistency for a "
                                              "distilled checkpoint, else heun)")] = "auto",
    engine: Annotated[str, typer.Option(help="torch, or onnxruntime (CPU; exports the network on the fly "
                                             "unless --onnx is given)")] = "torch",
    onnx: Annotated[Optional[Path], typer.Option(help="ONNX file of the network for --engine onnxruntime")] = None,
    seed: Annotated[int, typer.Option(help="random seed", min=0, max=MAX_SEED)] = 0,
    batch_size: Annotated[int, typer.Option(min=1, help="showers per batch")] = 64,
    format: Annotated[OutputFormat, typer.Option("--format", "-f", help="output layout")] = OutputFormat.points,
    digitise: Annotated[bool, typer.Option(help="sum points into cells and apply the threshold")] = True,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda")] = "auto",
    compile: Annotated[bool, typer.Option(
        "--compile", help="compile the flow's sampling (torch.compile, tens of seconds once, needs a C++ compiler "
                          "on a CPU): worth it at small batches, where the flow's many small operations cost most "
                          "(docs/speed.md)")] = False,
    threads: ThreadsOption = None,
) -> None:
    """Generate showers with a trained (pre-trained, adapted or distilled) model in any geometry."""
    _use_threads(threads)
    from .data import ShowerWriter
    from .generate import iter_generate
    from .geometry import get_geometry
    from .pretrained import default_checkpoint
    from .simulate import parse_energy_range, sample_incident_energies
    from .models.checkpoint import load_model
    from .train import resolve_device

    geo = get_geometry(geometry)
    _refuse_output_as_input(output, checkpoint, "the --checkpoint it generates with")
    _refuse_output_as_input(output, onnx, "the --onnx network it generates with")
    incoming = None
    if energies_from is not None:
        _refuse_output_as_input(output, energies_from, "the --energies-from file")
        energies, *incoming = _file_incidence(energies_from, n)
        if n is not None and len(energies) < n:
            raise CaloadaptError(f"{energies_from}: holds {len(energies)} showers, fewer than --n {n}")
    else:
        energies = sample_incident_energies(1000 if n is None else n, parse_energy_range(energy), spectrum.value,
                                            np.random.default_rng(seed))
    theta_deg, phi_deg = _incidence_angles(len(energies), theta, phi, seed, geo, incoming)
    # showers at normal incidence are generated (and written) as before angles existed
    normal = np.all(theta_deg == 90.0) and np.all(phi_deg == 90.0)
    angles = {} if normal else {"theta_deg": theta_deg, "phi_deg": phi_deg}
    source = checkpoint if checkpoint is not None else default_checkpoint()
    model, stored = load_model(source)
    chosen = _choose_sampler(sampler, stored).with_steps(steps).with_sigma_max(sigma_max)
    run_device = resolve_device(device)
    if threads is None and chosen.kind == "consistency" and run_device.type == "cpu" and \
            "OMP_NUM_THREADS" not in os.environ:
        _use_threads("1")  # one-step generation is fastest on one thread per process (docs/speed.md)
    if engine == "onnxruntime":
        model, run_device = _onnx_engine(model, source, onnx), torch.device("cpu")
    elif engine != "torch":
        raise CaloadaptError(f"unknown engine {engine!r}; expected torch or onnxruntime")
    if compile:
        model = model.to(run_device)
        typer.echo("compiling the flow's sampling (once; tens of seconds)", err=True)
        try:
            model.flow.compile_sampling()
        except RuntimeError as err:
            raise CaloadaptError(f"--compile: {err}") from None
    attrs = {"command": " ".join(sys.argv), "seed": seed, "sampler": chosen.kind, "steps": chosen.steps,
             "sigma_max": chosen.sigma_max, "engine": engine}
    with ShowerWriter(output, format.value, geo, attrs) as writer:
        for chunk in iter_generate(model, geo, energies, chosen, particle=particle or geo.particle,
                                   seed=seed, batch_size=batch_size, digitise=digitise, device=run_device,
                                   progress=True, **angles):
            writer.append(chunk)
    typer.echo(f"wrote {len(energies)} generated showers in {geo.name} to {output} ({format.value})")


def _choose_sampler(kind: str, stored: Sampler) -> Sampler:
    """The sampler to use: the checkpoint's own (``auto``) or another ODE solver on its schedule;
    distilled models take only the consistency sampler and vice versa."""
    if kind == "auto":
        return stored
    if kind == "consistency" and not stored.distilled:
        raise CaloadaptError("one-step (consistency) generation needs a distilled checkpoint (caloadapt distill)")
    if kind != "consistency" and stored.distilled:
        raise CaloadaptError(f"a distilled checkpoint samples with the consistency sampler, not {kind!r}")
    if kind not in SAMPLER_KINDS:
        raise CaloadaptError(f"unknown sampler {kind!r}; expected auto, {', '.join(SAMPLER_KINDS)}")
    return dataclasses.replace(stored, kind=kind)


def _onnx_engine(model, checkpoint: Path, onnx_file: Path | None):
    """The model with its network running in onnxruntime (exported and parity-checked if needed)."""
    import tempfile

    from .export import PARITY_TOLERANCE, export_checkpoint_onnx, onnx_model, parity_check

    if onnx_file is not None:
        return onnx_model(model, onnx_file)
    # exported for this run only: onnxruntime holds the network once its session is made
    with tempfile.TemporaryDirectory(prefix="caloadapt-onnx-") as folder:
        onnx_file = Path(folder) / "network.onnx"
        _, exported, _ = export_checkpoint_onnx(checkpoint, onnx_file)
        difference = parity_check(exported, onnx_file)
        if difference > PARITY_TOLERANCE:
            raise CaloadaptError(f"ONNX export differs from PyTorch by {difference:.2e} (> {PARITY_TOLERANCE:g})")
        return onnx_model(model, onnx_file)


@app.command()
@_one_line_errors
def distill(
    checkpoint: Annotated[Path, typer.Option(help="trained (pre-trained or adapted) checkpoint: the teacher")],
    data: Annotated[Path, typer.Option("--data", help="showers to distil on (the teacher's training data)")],
    output: Annotated[Path, typer.Option("--output", "-o", help="run directory")],
    geometry: Annotated[Optional[str], typer.Option("--geometry", "-g", help="geometry of the data")] = None,
    steps: Annotated[int, typer.Option(min=1, help="distillation steps")] = 2000,
    batch_size: Annotated[int, typer.Option(min=1)] = 32,
    lr: Annotated[Optional[float], typer.Option(
        help="learning rate (default: 1e-4 for a student of the teacher's size, which starts from the teacher's "
             "weights; 5e-4 for a smaller one, which starts fresh)", show_default=False)] = None,
    flow_lr: Annotated[float, typer.Option(help="learning rate of a student flow of its own")] = 1e-3,
    max_points: Annotated[int, typer.Option(min=1, help="points per shower per step")] = 1024,
    n_samples: Annotated[Optional[int], typer.Option(help="showers drawn from the file (default all)")] = None,
    val_every: Annotated[int, typer.Option(min=1)] = 200,
    seed: Annotated[int, typer.Option(min=0, max=MAX_SEED)] = 0,
    data_seed: Annotated[int, typer.Option(min=0, max=MAX_SEED)] = 0,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda")] = "auto",
    resume: Annotated[bool, typer.Option("--resume", help="continue from the run's last checkpoint")] = False,
    overwrite: OverwriteOption = False,
    sigma_max: Annotated[Optional[float], typer.Option(
        help="largest noise level distilled, where the one-step sampler starts (default: the teacher's sampler's)",
        show_default=False)] = None,
    student_widths: Annotated[Optional[str], typer.Option(
        help="hidden widths of a pointwise student, e.g. 64,128,64, or 'teacher' for the teacher's (default: "
             "32,32 where that is smaller than the teacher; docs/speed.md)", show_default=False)] = None,
    student_dim: Annotated[Optional[int], typer.Option(min=8, help="width of a transformer student",
                                                       show_default=False)] = None,
    student_depth: Annotated[Optional[int], typer.Option(min=1, help="blocks of a transformer student",
                                                         show_default=False)] = None,
    student_flow_transforms: Annotated[Optional[int], typer.Option(
        min=1, help="coupling transforms of a smaller student flow, trained beside the distillation",
        show_default=False)] = None,
    student_flow_hidden: Annotated[Optional[str], typer.Option(
        help="hyper-network widths of a smaller student flow, e.g. 64,64", show_default=False)] = None,
    threads: ThreadsOption = None,
) -> None:
    """Consistency distillation into a one-step (and two-step) sampler (CaloClouds II recipe); the student
    can be smaller than the teacher."""
    _use_threads(threads)
    from .data.io import file_geometry
    from .models.checkpoint import load_model
    from .train.distill import FRESH_STUDENT_LR, DistillConfig, default_student_widths, distill as run_distill

    from .train import resolve_device

    for name, value in (("--lr", 1.0 if lr is None else lr), ("--flow-lr", flow_lr),
                        ("--sigma-max", 1.0 if sigma_max is None else sigma_max)):
        if not (np.isfinite(value) and value > 0):
            raise CaloadaptError(f"{name} must be a positive number, got {value}")
    resolve_device(device)
    (teacher, teacher_sampler), geo = load_model(checkpoint), file_geometry(data, geometry)
    if student_widths is None:
        widths = default_student_widths(teacher.config)  # with --student-dim, student_config says what is wrong
    else:
        widths = None if student_widths.strip() == "teacher" else _csv_ints(student_widths)
    # the student learns the map from the noise level the teacher is sampled from: above it the teacher
    # was not calibrated, and the Heun steps of the distillation grid would be spent where they do not matter
    config = DistillConfig(steps=steps, batch_size=batch_size, lr=lr or DistillConfig.lr, flow_lr=flow_lr,
                           max_points=max_points,
                           sigma_max=teacher_sampler.sigma_max if sigma_max is None else sigma_max,
                           n_samples=n_samples, val_every=val_every, checkpoint_every=val_every, seed=seed,
                           data_seed=data_seed, device=device, student_widths=widths,
                           student_dim=student_dim, student_depth=student_depth,
                           student_flow_transforms=student_flow_transforms,
                           student_flow_hidden=None if student_flow_hidden is None else _csv_ints(student_flow_hidden))
    student = config.student_config(teacher.config)  # a student of the wrong backbone fails before the run folder
    size = ("widths", "transformer_dim", "transformer_depth")
    if lr is None and any(getattr(student, k) != getattr(teacher.config, k) for k in size):
        config = dataclasses.replace(config, lr=FRESH_STUDENT_LR)  # a fresh student, not a warm start
    _claim_run(output, resume, overwrite, [checkpoint, data])
    # the run folder is locked by the training loop
    summary = run_distill(teacher, data, geo, output, config, resume=resume,
                          checkpoint_parts={"command": " ".join(sys.argv), "teacher": str(checkpoint)})
    typer.echo(f"distilled {summary['steps']} steps in {summary['wall_s']:.0f} s; best one-step validation "
               f"error {summary['best']['one_step']:.4g} (step {summary['best_step']['one_step']}); "
               f"model in {summary['checkpoint']}")


@app.command("train-flow")
@_one_line_errors
def train_flow(
    checkpoint: Annotated[Path, typer.Option(help="trained checkpoint (a path or a shipped model's name): its point "
                                                  "network is kept, its flow trained")],
    data: Annotated[Path, typer.Option("--data", help="showers to train on (the model's training data)")],
    output: Annotated[Path, typer.Option("--output", "-o", help="run directory")],
    geometry: Annotated[Optional[str], typer.Option("--geometry", "-g", help="geometry of the data")] = None,
    steps: Annotated[int, typer.Option(min=1, help="optimiser steps")] = 2000,
    batch_size: Annotated[int, typer.Option(min=1, help="showers per step")] = 128,
    flow_lr: Annotated[Optional[float], typer.Option(
        help="peak learning rate (default: 3e-4 to go on training the checkpoint's flow, 1e-3 for a new one)",
        show_default=False)] = None,
    flow_transforms: Annotated[Optional[int], typer.Option(
        min=1, help="a new flow with this many coupling transforms, trained from scratch", show_default=False)] = None,
    flow_hidden: Annotated[Optional[str], typer.Option(
        help="a new flow with these hyper-network widths, e.g. 64,64", show_default=False)] = None,
    n_samples: Annotated[Optional[int], typer.Option(help="showers drawn from the file [default: the checkpoint's "
                                                          "run's, else all]", show_default=False)] = None,
    val_fraction: Annotated[Optional[float], typer.Option(
        help="share held out for validation [default: the checkpoint's run's, so that its validation showers "
             "stay unseen; else 0.05]", show_default=False)] = None,
    data_seed: Annotated[Optional[int], typer.Option(
        min=0, max=MAX_SEED, help="seed of the data subset and split [default: the checkpoint's run's, else 0]",
        show_default=False)] = None,
    val_every: Annotated[int, typer.Option(min=1, help="steps between validations/checkpoints")] = 250,
    seed: Annotated[int, typer.Option(help="seed of a new flow's initialisation", min=0, max=MAX_SEED)] = 0,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda")] = "auto",
    occupancy_showers: Annotated[int, typer.Option(min=0, help="training showers the occupancy calibration is "
                                                               "fitted on after training (0: none)")] = 128,
    resume: Annotated[bool, typer.Option("--resume", help="continue from the run's last checkpoint")] = False,
    overwrite: OverwriteOption = False,
    threads: ThreadsOption = None,
) -> None:
    """Train a model's flow by itself (its point network kept): further, or a new flow of another size."""
    _use_threads(threads)
    from .data.io import file_geometry
    from .train import TrainConfig, load_checkpoint, resolve_device
    from .train.flow_training import train_flow as run_train_flow

    resolve_device(device)
    new_flow = flow_transforms is not None or flow_hidden is not None
    lr = flow_lr if flow_lr is not None else (1e-3 if new_flow else 3e-4)
    if not (np.isfinite(lr) and lr > 0):
        raise CaloadaptError(f"--flow-lr must be a positive number, got {lr}")
    ran = load_checkpoint(checkpoint).get("train_config") or {}
    geo = file_geometry(data, geometry)
    # only the per-shower statistics are learnt: one point per shower is read for the batch's shape
    config = TrainConfig(steps=steps, batch_size=batch_size, flow_lr=lr, max_points=1, val_max_points=1,
                         n_samples=n_samples if n_samples is not None else ran.get("n_samples"),
                         val_fraction=val_fraction if val_fraction is not None else ran.get("val_fraction", 0.05),
                         data_seed=data_seed if data_seed is not None else ran.get("data_seed", 0),
                         val_every=val_every, checkpoint_every=val_every, seed=seed, device=device,
                         occupancy_showers=occupancy_showers)
    _claim_run(output, resume, overwrite, [checkpoint, data])
    summary = run_train_flow(checkpoint, data, geo, output, config, flow_transforms=flow_transforms,
                             flow_hidden=None if flow_hidden is None else _csv_ints(flow_hidden), resume=resume,
                             checkpoint_parts={"command": " ".join(sys.argv)})
    typer.echo(f"trained the flow {summary['steps']} steps in {summary['wall_s']:.0f} s; best validation "
               f"{summary['best']['flow']:.4f} (step {summary['best_step']['flow']}); model in {output / 'best.pt'}")


@app.command()
@_one_line_errors
def benchmark(
    output: Annotated[Path, typer.Option("--output", "-o", help="JSON results (a .txt table is written beside)")]
    = Path("benchmark.json"),
    checkpoint: Annotated[Optional[Path], typer.Option(help="model to time (default: shipped)")] = None,
    distilled: Annotated[Optional[Path], typer.Option(help="distilled checkpoint for the one-step case")] = None,
    quick: Annotated[bool, typer.Option("--quick", help="small batches and energies (seconds)")] = False,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda")] = "auto",
    steps: Annotated[int, typer.Option(min=1, help="Heun/Euler steps")] = DEFAULT_STEPS,
    onnx: Annotated[bool, typer.Option(help="time the onnxruntime path")] = True,
    theta: Annotated[float, typer.Option(help="polar angle of incidence of the ILD photons, degrees (another "
                                              "than 90 needs a model trained with --angle-conditioning)")] = 90.0,
    threads: Annotated[Optional[str], typer.Option(
        help="the CPU thread count timed besides one thread: a positive integer, or auto: every core this "
             "process may use", show_default=False)] = None,
    budget_s: Annotated[Optional[float], typer.Option(
        "--budget-s", min=1.0, help="seconds one measurement may take; a batch estimated to take longer is "
                                    "skipped (default 120, quick 20)", show_default=False)] = None,
    compile: Annotated[bool, typer.Option(
        "--compile", help="also time the one-step model with its flow compiled (generate --compile)")] = False,
) -> None:
    """Milliseconds per shower of the simulator and of every generation path, at several batch sizes."""
    from ._threads import parse_threads
    from .benchmark import format_table, run_benchmark

    timed = parse_threads(threads)
    for written in (output, output.with_suffix(".txt")):
        for source, what in ((checkpoint, "the --checkpoint it times"), (distilled, "the --distilled checkpoint")):
            _refuse_output_as_input(written, source, what)
    _use_threads(None)  # the untimed set-up; each timed case sets its own thread count
    report = run_benchmark(checkpoint, output, quick=quick, device=device, distilled=distilled, n_steps=steps,
                           onnx=onnx, threads=None if timed is None else (1, timed), theta_deg=theta,
                           budget_s=budget_s, compile=compile, log=typer.echo)
    typer.echo(format_table(report))


@app.command()
@_one_line_errors
def finetune(
    data: Annotated[Path, typer.Option("--data", help="target training shower file")],
    output: Annotated[Path, typer.Option("--output", "-o", help="run directory")],
    checkpoint: Annotated[Optional[Path], typer.Option(help="pre-trained checkpoint (default: shipped model)")] = None,
    geometry: Annotated[Optional[str], typer.Option("--geometry", "-g",
                                                    help="geometry of the data (default: from the file)")] = None,
    n_samples: Annotated[Optional[int], typer.Option(help="target showers used (train + validation)")] = 100,
    method: Annotated[str, typer.Option(help="scratch, full, bitfit, bitfit-context, top-k, lora, dora, ia3, loha")]
    = "full",
    k: Annotated[int, typer.Option(help="top-k: number of last layers trained")] = 3,
    rank: Annotated[int, typer.Option(help="lora/dora/loha rank")] = 8,
    alpha: Annotated[float, typer.Option(help="lora/dora/loha alpha")] = 8.0,
    target: Annotated[str, typer.Option(help="adapted Linear maps: linear, gate, context_bias (comma list)")]
    = "linear",
    layers: Annotated[Optional[str], typer.Option(help="adapted layer indices, e.g. 3,4,5 (default all)")] = None,
    flow: Annotated[str, typer.Option(help="flow adaptation: full, frozen, bitfit (its biases) or lora (its "
                                           "biases and a rank --rank update of its hidden layers)")] = "full",
    steps: Annotated[int, typer.Option(min=1, help="optimiser steps")] = 1000,
    batch_size: Annotated[int, typer.Option(min=1, help="showers per step")] = 16,
    lr: Annotated[Optional[float], typer.Option(help="peak learning rate (default: 3 x the data-size table, "
                                                     "times the method's factor; docs/model.md section 7)")]
    = None,
    flow_lr: Annotated[Optional[float], typer.Option(help="flow learning rate (default: 3 x the data-size table; "
                                                          "30 x with --flow bitfit or lora)")]
    = None,
    max_points: Annotated[int, typer.Option(min=1, help="points per shower per step")] = 256,
    val_fraction: Annotated[float, typer.Option(help="share of the showers held out for validation")] = 0.2,
    val_every: Annotated[int, typer.Option(min=1, help="steps between validations/checkpoints")] = 50,
    patience: Annotated[Optional[int], typer.Option(help="early stop after N validations without gain")] = None,
    seed: Annotated[int, typer.Option(help="seed of the run (initialisation of new weights, noise)", min=0,
                                      max=MAX_SEED)] = 0,
    data_seed: Annotated[int, typer.Option(help="seed of the target subset and its split", min=0, max=MAX_SEED)] = 0,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda")] = "auto",
    occupancy_showers: Annotated[int, typer.Option(min=0, help="training showers per detector the occupancy "
                                                               "calibration is fitted on after training (0: none)")]
    = 128,
    hits_as_spots: Annotated[Optional[bool], typer.Option(
        "--hits-as-spots/--one-point-per-hit",
        help="train on the target's hits split into spot-like points, as the shipped models were pre-trained "
             "(default: as the pre-trained model was trained; docs/fidelity.md)", show_default=False)] = None,
    one_step: Annotated[bool, typer.Option(
        "--one-step", help="also distil the adapted model into a one-step student, RUN/model-1step.pt "
                           "(milliseconds per shower; docs/fidelity.md)")] = False,
    one_step_steps: Annotated[Optional[int], typer.Option(
        min=1, help="distillation steps of the one-step student (default: 300 from the pre-trained model's "
                    "shipped student, 2000 for a fresh one)", show_default=False)] = None,
    student_init: Annotated[Optional[str], typer.Option(
        help="one-step checkpoint the student starts from, or 'fresh' (default: the shipped student of the "
             "pre-trained model where there is one)", show_default=False)] = None,
    resume: Annotated[bool, typer.Option("--resume", help="continue from the run's last checkpoint")] = False,
    overwrite: OverwriteOption = False,
    threads: ThreadsOption = None,
) -> None:
    """Adapt a pre-trained model to a target detector (or train the scratch baseline); with --one-step, also
    its one-step student."""
    _use_threads(threads)
    from .adapt import AdaptMethod, finetune as run_finetune
    from .data.io import count_showers, file_geometry
    from .pretrained import default_checkpoint
    from .sweep.recipe import adaptation_config
    from .train.rundir import run_lock

    geo = file_geometry(data, geometry)
    adapt_method = AdaptMethod(name=method, k=k, rank=rank, alpha=alpha, target=target, flow=flow,
                               layers=_csv_ints(layers) if layers else None)
    size = n_samples if n_samples is not None else count_showers(data)
    config = adaptation_config(method, size, flow=flow, val_every=val_every, lr=lr, flow_lr=flow_lr, steps=steps,
                               batch_size=batch_size, max_points=max_points, n_samples=n_samples,
                               val_fraction=val_fraction, patience=patience, seed=seed, data_seed=data_seed,
                               device=device, occupancy_showers=occupancy_showers)
    pretrained = checkpoint or default_checkpoint()
    init = None
    if one_step:
        from .adapt.one_step import one_step_config, student_start
        init = student_start(pretrained, student_init)
        distill_config = one_step_config(config, "fresh" if init is None else "init", one_step_steps)
    _claim_run(output, resume, overwrite, [pretrained, data, init])
    with run_lock(output):
        summary = run_finetune(pretrained, data, geo, output, adapt_method, config, resume=resume,
                               checkpoint_parts={"command": " ".join(sys.argv)}, hits_as_spots=hits_as_spots,
                               log=typer.echo)
    whole = summary["whole_model"]
    typer.echo(f"{adapt_method.label()} (flow: {'full' if method == 'scratch' else flow}): trains "
               f"{whole['trainable']:,} of {whole['total']:,} parameters of the whole model ({whole['percent']:.2f} %; "
               f"point network {whole['trainable_net']:,}, flow {whole['trainable_flow']:,})")
    typer.echo(f"{adapt_method.label()}: {summary['steps']} steps in {summary['wall_s']:.0f} s; best validation "
               f"diffusion {summary['best']['diffusion']:.4f}, flow {summary['best']['flow']:.4f}; "
               f"model in {output / 'model.pt'}")
    if one_step:
        from .adapt.one_step import one_step_student

        typer.echo(f"one-step student: {distill_config.steps} distillation steps from "
                   + (f"{init}" if init is not None else "a fresh network"))
        student = one_step_student(output / "model.pt", data, geo, output / "model-1step.pt", distill_config,
                                   init=init, resume=resume, checkpoint_parts={"command": " ".join(sys.argv)})
        typer.echo(f"one-step student: {student['steps']} steps in {student['wall_s']:.0f} s; best one-step "
                   f"validation error {student['best']['one_step']:.4g}; model in {output / 'model-1step.pt'}")


@app.command("analyze-updates")
@_one_line_errors
def analyze_updates(
    pretrained: Annotated[Path, typer.Argument(help="pre-trained checkpoint")],
    finetuned: Annotated[list[Path], typer.Argument(help="one or more fine-tuned checkpoints")],
    output: Annotated[Path, typer.Option("--output", "-o", help="output directory")] = Path("updates"),
    threads: ThreadsOption = None,
) -> None:
    """Singular values, effective rank and reconstruction error of the weight updates of adaptation."""
    _use_threads(threads)
    from .adapt import analyse_checkpoints

    analyse_checkpoints(pretrained, finetuned if len(finetuned) > 1 else finetuned[0], output)
    typer.echo(f"wrote {output / 'updates.json'} and plots to {output}")


@app.command()
@_one_line_errors
def sweep(
    data: Annotated[Path, typer.Option("--data", help="target training shower file")],
    reference: Annotated[Path, typer.Option(help="held-out target showers to compare with (never trained on)")],
    output: Annotated[Path, typer.Option("--output", "-o", help="sweep directory")],
    checkpoint: Annotated[Optional[list[str]], typer.Option(help="pre-trained checkpoint, or LABEL=PATH; repeat to "
                                                                 "compare pre-trainings (default: shipped model)")]
    = None,
    geometry: Annotated[Optional[str], typer.Option("--geometry", "-g", help="target geometry (default: from --data)")]
    = None,
    sizes: Annotated[str, typer.Option(help="target data sizes D")] = "100,1000,10000",
    methods: Annotated[str, typer.Option(help="methods, e.g. scratch,full,bitfit,lora:rank=16 or bitfit:flow=frozen "
                                              "(flow: full, bitfit, frozen); zero-shot adds generation with each "
                                              "pre-trained model as it is; scratch-converged trains the scratch "
                                              "baseline with early stopping (--patience, --max-steps)")]
    = "scratch,full,bitfit,lora",
    seeds: Annotated[int, typer.Option(min=1, help="seeds per (method, size): 0..N-1 (data subset and run)")] = 5,
    steps: Annotated[int, typer.Option(min=1, help="training steps of every run")] = 1000,
    batch_size: Annotated[int, typer.Option(min=1)] = 32,
    max_points: Annotated[int, typer.Option(min=1)] = 512,
    n_eval: Annotated[int, typer.Option(min=2, help="reference and generated showers compared per run")] = 1000,
    sampler_steps: Annotated[Optional[int], typer.Option(
        min=1, help="sampler steps at generation [default: each checkpoint's own sampler's]")] = None,
    floor: Annotated[Optional[Path], typer.Option(help="a second sample of the reference source (ideally at its "
                                                       "energies: simulate --energies-from): G_floor and G / G_floor "
                                                       "in every result and the summary")] = None,
    patience: Annotated[int, typer.Option(min=1, help="scratch-converged: stop after N validations without "
                                                      "improvement")] = 5,
    max_steps: Annotated[Optional[int], typer.Option(min=1, help="scratch-converged: step cap (default 10 x "
                                                                 "--steps)")] = None,
    lr_by_size: Annotated[bool, typer.Option(help="learning rates from the published table by data size; "
                                                  "--no-lr-by-size: the D <= 100 rates at every size (short "
                                                  "budgets)")] = True,
    compare_normalisation: Annotated[bool, typer.Option(help="require checkpoints in both the physical and the "
                                                             "published box frame, and compare them")] = False,
    executor: Annotated[str, typer.Option(help="local (worker processes) or slurm (submitit)")] = "local",
    workers: Annotated[Optional[int], typer.Option(min=1, help="local worker processes [default: the thread "
                                                               "choice of --threads auto / threads per run]")]
    = None,
    threads: Annotated[Optional[str], typer.Option(
        help="torch threads per run: a positive integer, or auto: the cores this process may use (shared with "
             "other caloadapt processes, less the load; docs/threads.md) split among the workers; with slurm "
             "auto is 1 [default: auto]", show_default=False)] = None,
    slurm_partition: Annotated[Optional[str], typer.Option(help="Slurm partition")] = None,
    slurm_time: Annotated[int, typer.Option(help="Slurm time limit per run, minutes")] = 240,
) -> None:
    """Data-efficiency sweep: every method x data size x seed, evaluated; table and plot at the end."""
    from ._threads import apply_threads, parse_threads, split_threads
    from .data.io import file_geometry
    from .pretrained import default_checkpoint, resolve_checkpoint
    from .sweep import SweepSpec, run_sweep, summarise
    from .train import load_checkpoint

    per_run = parse_threads(threads)
    # the cores this sweep may use now (OMP_NUM_THREADS, when set: its limit); its local workers split them
    budget = apply_threads(None, respect_omp_num_threads=threads is None)
    if executor == "local":
        workers, per_run = split_threads(budget, workers, per_run)
    else:  # the cluster gives each run its own cores (cpus_per_task)
        per_run = per_run or 1
    checkpoints: dict[str, str] = {}
    for item in checkpoint or [f"pretrained={default_checkpoint()}"]:
        label, sep, path = item.partition("=")
        label, path = (label, path) if sep else (Path(item).stem, item)
        checkpoints[label] = str(resolve_checkpoint(path).resolve())
    frames = {label: load_checkpoint(path)["model_config"]["frame"] for label, path in checkpoints.items()}
    if compare_normalisation and set(frames.values()) != {"physical", "box"}:
        raise CaloadaptError("--compare-normalisation needs one checkpoint per frame (physical and box); make the "
                             "box one with 'caloadapt pretrain --frame box' and pass both as --checkpoint LABEL=PATH")
    geo = file_geometry(data, geometry)
    spec = SweepSpec(checkpoints=checkpoints, data=str(data.resolve()), reference=str(reference.resolve()),
                     geometry=geo.name if geometry is None else geometry, sizes=_csv_ints(sizes),
                     methods=tuple(m.strip() for m in _split_methods(methods)), seeds=tuple(range(seeds)),
                     steps=steps, batch_size=batch_size, max_points=max_points, n_eval=n_eval,
                     n_steps_sampler=sampler_steps, threads=per_run, lr_by_size=lr_by_size,
                     floor=str(floor.resolve()) if floor is not None else None, patience=patience,
                     max_steps=max_steps)
    if floor is not None:
        from .data.io import detect_format

        detect_format(floor)  # a missing or unreadable floor fails before any run starts
    slurm = {"timeout_min": slurm_time, **({"slurm_partition": slurm_partition} if slurm_partition else {})}
    summarise(run_sweep(spec, output, executor=executor, workers=workers, slurm=slurm, log=typer.echo), output)
    typer.echo((output / "summary.md").read_text())


def _split_methods(text: str) -> list[str]:
    """Split ``a,b:rank=4,alpha=8,c`` at commas that start a new method (not inside its options)."""
    from .adapt import METHODS
    from .sweep.recipe import PSEUDO_METHODS

    methods: list[str] = []
    for part in text.split(","):
        if methods and part.split(":")[0].strip() not in (*METHODS, *PSEUDO_METHODS):
            methods[-1] += "," + part  # an option of the previous method
        else:
            methods.append(part)
    return methods


@app.command()
@_one_line_errors
def evaluate(
    generated: Annotated[Path, typer.Option(help="generated shower file (any layout)")],
    reference: Annotated[Path, typer.Option(help="reference shower file (e.g. Geant4 or simulated)")],
    output: Annotated[Path, typer.Option("--output", "-o", help="results directory")] = Path("results"),
    geometry: Annotated[Optional[str], typer.Option("--geometry", "-g", help="readout to compare in "
                                                                             "(default: the reference's)")] = None,
    max_showers: Annotated[Optional[int], typer.Option(help="use at most the first N showers of each file")] = None,
    classifier: Annotated[str, typer.Option(help="cpu (small DNN), official (evaluate.py settings) or none")]
    = "cpu",
    n_bootstrap: Annotated[int, typer.Option(min=0, help="bootstrap resamples of the scores")] = 50,
    floor: Annotated[Optional[Path], typer.Option(help="a second sample of the reference source, independent of "
                                                       "the reference: every score is also computed for it (the "
                                                       "floor) and the model / floor ratios reported")] = None,
    fpd_kpd: Annotated[Optional[bool], typer.Option(help="FPD and KPD on the CaloChallenge high-level features "
                                                         "(default: only with >= 10000 showers per sample)")]
    = None,
    plots: Annotated[bool, typer.Option(help="write plots")] = True,
    seed: Annotated[int, typer.Option(help="seed of bootstrap and classifier", min=0, max=MAX_SEED)] = 0,
    threads: ThreadsOption = None,
) -> None:
    """Compare generated with reference showers: scores, CaloChallenge metrics, plots and a report."""
    _use_threads(threads)
    from .data.io import file_geometry
    from .evaluate.pipeline import EvaluationOptions, run_evaluation
    from .evaluate.stream import source_geometry

    geo = file_geometry(reference, geometry)
    if geometry is None:
        _, generated_geometry = source_geometry(generated, geo)
        if generated_geometry.name != geo.name:
            raise CaloadaptError(f"{generated} holds showers of detector {generated_geometry.name!r}, {reference} of "
                                 f"{geo.name!r}; compare showers of one detector, or give --geometry to voxelise "
                                 "both into one readout")
    options = EvaluationOptions(max_showers=max_showers, classifier=classifier, n_bootstrap=n_bootstrap,
                                fpd_kpd=fpd_kpd, plots=plots, seed=seed)
    metrics = run_evaluation(generated, reference, geo, output, options, command=" ".join(sys.argv), floor=floor)
    summary = metrics["summary"]
    text = (f"geometric mean of normalised W1: G = {summary['geometric_mean']:.4f} "
            f"+- {summary['geometric_mean_std'] or float('nan'):.4f}")
    if floor is not None:
        ratio = summary.get("ratio_to_floor")
        text += (f"; floor G_floor = {summary['geometric_mean_floor']:.4f} "
                 f"+- {summary['geometric_mean_floor_std'] or float('nan'):.4f}; G / G_floor = "
                 + ("n/a" if ratio is None else f"{ratio:.3f}"))
    typer.echo(f"{text}; report: {output / 'report.md'}")


@app.command()
@_one_line_errors
def demo(
    output: Annotated[Path, typer.Option("--output", "-o", help="demo directory")] = Path("caloadapt-demo"),
    quick: Annotated[bool, typer.Option("--quick", help="reduced sizes: shows that the pipeline runs (about a "
                                                        "minute), not how well")] = False,
    teachers: Annotated[bool, typer.Option(
        "--teachers", help="also generate with each adapted model's own multi-step sampler, beside its one-step "
                           "student (seconds per shower: tens of minutes in all)")] = False,
    target_data: Annotated[Optional[Path], typer.Option(help="real target training file instead of simulated")]
    = None,
    reference_data: Annotated[Optional[Path], typer.Option(help="real held-out reference file")] = None,
    floor_data: Annotated[Optional[Path], typer.Option(help="with real data: a second sample of the reference "
                                                            "source, the floor (the simulated demo makes its own)")]
    = None,
    methods: Annotated[Optional[str], typer.Option(help="methods as for sweep, e.g. scratch,full,bitfit,"
                                                        "bitfit:flow=frozen,scratch-converged (flow: full, bitfit, "
                                                        "lora, frozen) [default: scratch,full,"
                                                        "lora:rank=8,alpha=8,flow=lora]")]
    = None,
    patience: Annotated[Optional[int], typer.Option(min=1, help="scratch-converged: stop after N validations "
                                                                "without improvement [default: 5]")] = None,
    max_steps: Annotated[Optional[int], typer.Option(min=1, help="scratch-converged: step cap [default: 10 x the "
                                                                 "budget]")] = None,
    checkpoint: Annotated[Optional[Path], typer.Option(help="pre-trained checkpoint (default: shipped)")] = None,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda")] = "auto",
    seed: Annotated[int, typer.Option(help="seed of data, training and generation", min=0, max=MAX_SEED)] = 0,
    threads: ThreadsOption = None,
) -> None:
    """The main job: adapt the shipped model to a new detector, distil one-step students, compare with scratch and
    the floor, write a report."""
    _use_threads(threads)
    from .demo import run_demo

    if (target_data is None) != (reference_data is None):
        raise CaloadaptError("give both --target-data and --reference-data, or neither")
    run_demo(output, quick=quick, teachers=teachers, target_data=target_data, reference_data=reference_data,
             floor_data=floor_data, checkpoint=checkpoint, device=device, seed=seed,
             methods=[m.strip() for m in _split_methods(methods)] if methods else None, patience=patience,
             max_steps=max_steps, log=typer.echo)


class ExportFormat(str, Enum):
    checkpoint = "checkpoint"
    onnx = "onnx"
    torchscript = "torchscript"


class ExportContract(str, Enum):
    ddml = "ddml"
    par04 = "par04"


@app.command()
@_one_line_errors
def export(
    checkpoint: Annotated[Path, typer.Option(help="trained checkpoint")],
    output: Annotated[Path, typer.Option("--output", "-o", help="exported file")],
    format: Annotated[ExportFormat, typer.Option("--format", "-f", help="checkpoint: weights-only copy "
                                                                       "(EMA weights, provenance kept); onnx: the "
                                                                       "point network for onnxruntime; torchscript: "
                                                                       "the whole one-step generator, torch alone "
                                                                       "(docs/geant4.md)")]
    = ExportFormat.checkpoint,
    opset: Annotated[int, typer.Option(help="ONNX opset")] = 17,
    contract: Annotated[ExportContract, typer.Option(help="torchscript: ddml (DDML's point cloud) or par04 (Par04's "
                                                          "scoring mesh)")] = ExportContract.ddml,
    geometry: Annotated[Optional[str], typer.Option("--geometry", "-g", help="torchscript: the geometry it "
                                                    "generates in [default: the checkpoint's; generic-mesh for "
                                                    "par04]", show_default=False)] = None,
    max_points: Annotated[int, typer.Option(min=2, help="torchscript ddml: quadruples of the output, header "
                                                        "included (6868 / 4: DDML's CaloCloudsTwoAngleModel buffer)")]
    = 1717,
    threads: ThreadsOption = None,
) -> None:
    """Export a trained model: a weights-only checkpoint, the network as ONNX (parity-checked), or the whole
    one-step generator as TorchScript."""
    _use_threads(threads)
    _refuse_output_as_input(output, checkpoint, "the --checkpoint it exports")
    if format == ExportFormat.torchscript:
        from .export.torchscript import export_checkpoint_torchscript

        path, _, target, _ = export_checkpoint_torchscript(checkpoint, output, geometry=geometry,
                                                           contract=contract.value, max_points=max_points)
        size = path.stat().st_size / 2**20
        shape = (f"float32[{4 * max_points}]" if contract == ExportContract.ddml else
                 f"float32[{int(target.readout.cells_per_layer[0]) * target.n_layers}]")
        typer.echo(f"wrote {output} ({size:.1f} MiB): the {contract.value} generator of {target.name}, batch 1, "
                   f"output {shape}; metadata in caloadapt.json inside it")
        return
    if format == ExportFormat.checkpoint:
        from .train import inference_checkpoint

        size = inference_checkpoint(checkpoint, output)
        typer.echo(f"wrote {output} ({size / 2**20:.1f} MiB)")
        return
    from .export import PARITY_TOLERANCE, export_checkpoint_onnx, parity_check

    path, model, settings = export_checkpoint_onnx(checkpoint, output, opset=opset)
    difference = parity_check(model, path)
    if difference > PARITY_TOLERANCE:
        path.unlink(missing_ok=True)
        raise CaloadaptError(f"ONNX export differs from PyTorch by {difference:.2e} (> {PARITY_TOLERANCE:g})")
    kind = "consistency function" if settings else "diffusion denoiser"
    typer.echo(f"wrote {output}: {kind}, dynamic batch and points; max |ONNX - PyTorch| = {difference:.1e}")


@app.command()
@_one_line_errors
def calibrate(
    checkpoint: Annotated[Path, typer.Option(help="trained checkpoint (a path or a shipped model's name)")],
    data: Annotated[list[Path], typer.Option("--data", help="the run's training shower file; repeat it for "
                                                           "each detector of a joint training")],
    output: Annotated[Path, typer.Option("--output", "-o", help="calibrated weights-only checkpoint")],
    geometry: Annotated[Optional[str], typer.Option("--geometry", "-g", help="geometry of a single --data "
                                                                             "file (default: from the file)")] = None,
    n_showers: Annotated[int, typer.Option(min=1, help="training showers per detector the fit uses")] = 128,
    seed: Annotated[int, typer.Option(help="seed of the fit's generation passes")] = 0,
    sigma_max: Annotated[Optional[float], typer.Option(
        help="noise level the model is to be sampled from: the fit uses it and the written checkpoint "
             "stores it [default: the checkpoint's]")] = None,
    steps: Annotated[Optional[int], typer.Option(
        min=1, max=10000, help="sampler steps the model is to be sampled with: the fit uses them and the "
                               "written checkpoint stores them [default: the checkpoint's]")] = None,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda")] = "auto",
    threads: ThreadsOption = None,
) -> None:
    """Fit the occupancy calibration of a trained model on its training showers (found again from the
    options the checkpoint records) and write a weights-only copy that holds it."""
    from .data.io import file_geometry
    from .models.checkpoint import load_model
    from .train import DataSource, calibrate_occupancy, load_checkpoint, resolve_device, write_inference_checkpoint

    _use_threads(threads)
    if geometry is not None and len(data) > 1:
        raise CaloadaptError("--geometry names the detector of a single file")
    for source, what in ((checkpoint, "the --checkpoint it calibrates"), *((path, "a --data file") for path in data)):
        _refuse_output_as_input(output, source, what)
    payload = load_checkpoint(checkpoint)
    model, sampler = load_model(payload, source=str(checkpoint))
    model, sampler = model.to(resolve_device(device)), sampler.with_sigma_max(sigma_max).with_steps(steps)
    sources = [DataSource(path, file_geometry(path, geometry)) for path in data]
    calibrate_occupancy(model, sources, payload.get("train_config"), n_showers=n_showers, seed=seed,
                        sampler=sampler)
    size = write_inference_checkpoint(model.cpu(), {**payload, "sampler": sampler.to_dict()}, output)
    for name, calibration in model.occupancy.items():
        fit = calibration.fit
        if name in {s.geometry.name for s in sources} and "generated_hits" in fit:
            ratio = sum(fit["generated_hits"]) / max(sum(fit["training_hits"]), 1e-12)
            typer.echo(f"{name}: {sum(fit['training_hits']):.1f} training hits per shower, calibrated generation "
                       f"{sum(fit['generated_hits']):.1f} ({ratio - 1:+.1%})")
    typer.echo(f"wrote {output} ({size / 2**20:.1f} MiB)")


def main() -> None:
    """Entry point of the ``caloadapt`` console script."""
    app()


if __name__ == "__main__":
    main()
