"""The ``caloadapt`` command line: a thin layer over the pipeline stages.

Energies on the command line are in GeV; files hold the units their format prescribes.
Errors caused by the input are printed as one line (``caloadapt: error: ...``), exit status 2.
"""

from __future__ import annotations

import functools
import json
import sys
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import numpy as np
import typer

from .errors import CaloadaptError

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Fast calorimeter shower simulation with cross-geometry transfer learning.")


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


def _one_line_errors(command):
    """Turn user-input errors into one line on stderr and exit status 2."""
    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except CaloadaptError as err:
            typer.echo(f"caloadapt: error: {err}", err=True)
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            typer.echo("caloadapt: interrupted; no partial output was kept", err=True)
            raise typer.Exit(130) from None
    return wrapper


GeometryOption = Annotated[str, typer.Option("--geometry", "-g",
                                             help="built-in name (ild-ecal, calochallenge-2, calochallenge-3, "
                                                  "generic-mesh) or a .yaml / binning .xml file")]


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
    seed: Annotated[int, typer.Option(help="random seed (energies and showers)")] = 1,
    format: Annotated[OutputFormat, typer.Option("--format", "-f", help="output file layout")] = OutputFormat.points,
    level: Annotated[Level, typer.Option(help="hits (digitised cells) or spots (energy depositions)")] = Level.hits,
    mode: Annotated[str, typer.Option(help="simulator mode: B (granular Si readout) or A (GFlash spots)")] = "B",
    validate: Annotated[bool, typer.Option("--validate", help="run the physics validation table instead")] = False,
    validate_n: Annotated[int, typer.Option(help="showers per point of the validation table")] = 400,
) -> None:
    """Simulate showers with the embedded GFlash simulator and write them to a file."""
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
    energies = sample_incident_energies(n, parse_energy_range(energy), spectrum.value, np.random.default_rng(seed))
    settings = SimulationSettings(mode=mode)
    attrs = {"command": " ".join(sys.argv), "seed": seed, "spectrum": spectrum.value, "simulator_mode": mode}
    with ShowerWriter(output, format.value if level == Level.hits else "points", geo, attrs) as writer:
        for chunk in iter_simulate(geo, particle, energies, seed=seed, level=level.value, settings=settings,
                                   progress=True):
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
    seed: Annotated[int, typer.Option(help="seed of the smearing")] = 1,
    chunk_size: Annotated[int, typer.Option(min=1, help="showers held in memory at once")] = 1000,
) -> None:
    """Convert a shower file between the points, ILD and CaloChallenge layouts."""
    from .data import ShowerWriter, iter_showers
    from .data.io import file_geometry

    if input.resolve() == output.resolve():
        raise CaloadaptError(f"{output}: output would overwrite the input")
    with ShowerWriter(output, format.value, file_geometry(input, geometry)) as writer:
        for chunk in iter_showers(input, geometry, chunk_size=chunk_size, smear=smear, seed=seed):
            writer.append(chunk)
    typer.echo(f"wrote {writer.n} showers to {output} ({format.value})")


@app.command()
@_one_line_errors
def info(
    file: Annotated[Path, typer.Argument(help="shower file")],
    geometry: Annotated[Optional[str], typer.Option("--geometry", "-g", help="geometry of the file")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
) -> None:
    """Show the format, geometry, counts, energy range and points per shower of a file."""
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
               f"  points     min {pts['min']}, mean {pts['mean']:.1f}, max {pts['max']} per shower")


def _csv_ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(","))
    except ValueError:
        raise CaloadaptError(f"expected comma-separated integers, got {text!r}") from None


def _run_training(data: Path, output: Path, geometry: str | None, steps: int, batch_size: int, lr: float,
                  flow_lr: float, max_points: int, n_samples: int | None, val_fraction: float, val_every: int,
                  seed: int, data_seed: int, device: str, resume: bool, frame: str, widths: str,
                  flow_hidden: str, flow_transforms: int, patience: int | None) -> None:
    """Pre-training and training from scratch share this: a fresh model trained on one file."""
    from .data.io import file_geometry
    from .models import FRAMES, ModelConfig, ShowerModel
    from .train import TrainConfig, train

    if frame not in FRAMES:
        raise CaloadaptError(f"unknown frame {frame!r}; expected one of {', '.join(FRAMES)}")
    geo = file_geometry(data, geometry)
    config = TrainConfig(steps=steps, batch_size=batch_size, lr=lr, flow_lr=flow_lr, max_points=max_points,
                         n_samples=n_samples, val_fraction=val_fraction, val_every=val_every,
                         checkpoint_every=val_every, seed=seed, data_seed=data_seed, device=device,
                         patience=patience)
    torch_model = ShowerModel(ModelConfig(frame=frame, widths=_csv_ints(widths), flow_hidden=_csv_ints(flow_hidden),
                                          flow_transforms=flow_transforms))
    summary = train(torch_model, data, geo, output, config, resume=resume,
                    checkpoint_parts={"command": " ".join(sys.argv)})
    typer.echo(f"trained {summary['steps']} steps in {summary['wall_s']:.0f} s; best validation: "
               f"diffusion {summary['best']['diffusion']:.4f} (step {summary['best_step']['diffusion']}), "
               f"flow {summary['best']['flow']:.4f} (step {summary['best_step']['flow']}); "
               f"checkpoints in {output}")


def _training_command(name: str, help_text: str, default_steps: int, default_val_fraction: float):
    @app.command(name, help=help_text)
    @_one_line_errors
    def command(
        data: Annotated[Path, typer.Option("--data", help="training shower file")],
        output: Annotated[Path, typer.Option("--output", "-o", help="run directory")],
        geometry: Annotated[Optional[str], typer.Option("--geometry", "-g",
                                                        help="geometry of the data (default: from the file)")] = None,
        steps: Annotated[int, typer.Option(min=1, help="optimiser steps")] = default_steps,
        batch_size: Annotated[int, typer.Option(min=1, help="showers per step")] = 32,
        lr: Annotated[float, typer.Option(help="peak learning rate of the point network")] = 1e-3,
        flow_lr: Annotated[float, typer.Option(help="peak learning rate of the flow")] = 1e-3,
        max_points: Annotated[int, typer.Option(min=1, help="points per shower per step")] = 512,
        n_samples: Annotated[Optional[int], typer.Option(help="showers drawn from the file (default all)")] = None,
        val_fraction: Annotated[float, typer.Option(help="share held out for validation")] = default_val_fraction,
        val_every: Annotated[int, typer.Option(min=1, help="steps between validations/checkpoints")] = 200,
        seed: Annotated[int, typer.Option(help="seed of initialisation and training noise")] = 0,
        data_seed: Annotated[int, typer.Option(help="seed of the data subset and split")] = 0,
        device: Annotated[str, typer.Option(help="auto, cpu or cuda")] = "auto",
        resume: Annotated[bool, typer.Option("--resume", help="continue from the run's last checkpoint")] = False,
        frame: Annotated[str, typer.Option(help="point frame: physical or box")] = "physical",
        widths: Annotated[str, typer.Option(help="point-network widths")] = "128,256,512,256,128",
        flow_hidden: Annotated[str, typer.Option(help="flow hyper-network widths")] = "128,128",
        flow_transforms: Annotated[int, typer.Option(min=1, help="flow coupling transforms")] = 6,
        patience: Annotated[Optional[int], typer.Option(help="early stop after N validations without gain")] = None,
    ) -> None:
        _run_training(data, output, geometry, steps, batch_size, lr, flow_lr, max_points, n_samples, val_fraction,
                      val_every, seed, data_seed, device, resume, frame, widths, flow_hidden, flow_transforms,
                      patience)
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
    n: Annotated[int, typer.Option("--n", "-n", min=1, help="number of showers")] = 1000,
    energy: Annotated[str, typer.Option(help="GeV: 50, a range 1:1000 or a list")] = "1:1000",
    spectrum: Annotated[Spectrum, typer.Option(help="incident-energy spectrum")] = Spectrum.log_uniform,
    energies_from: Annotated[Optional[Path], typer.Option(help="take the incident energies of this shower file "
                                                                "(e.g. the evaluation reference)")] = None,
    steps: Annotated[int, typer.Option(min=1, help="sampler steps (13: CaloClouds II)")] = 13,
    sampler: Annotated[str, typer.Option(help="heun or euler")] = "heun",
    seed: Annotated[int, typer.Option(help="random seed")] = 0,
    batch_size: Annotated[int, typer.Option(min=1, help="showers per batch")] = 64,
    format: Annotated[OutputFormat, typer.Option("--format", "-f", help="output layout")] = OutputFormat.points,
    digitise: Annotated[bool, typer.Option(help="sum points into cells and apply the threshold")] = True,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda")] = "auto",
) -> None:
    """Generate showers with a trained (pre-trained or adapted) model in any geometry."""
    from .data import ShowerWriter, iter_showers
    from .generate import iter_generate
    from .geometry import get_geometry
    from .pretrained import default_checkpoint
    from .simulate import parse_energy_range, sample_incident_energies
    from .train import model_from_checkpoint, resolve_device

    geo = get_geometry(geometry)
    if energies_from is not None:
        energies = np.concatenate([c.incident_energy_mev for c in iter_showers(energies_from, chunk_size=10_000)])
    else:
        energies = sample_incident_energies(n, parse_energy_range(energy), spectrum.value,
                                            np.random.default_rng(seed))
    model = model_from_checkpoint(checkpoint if checkpoint is not None else default_checkpoint())
    attrs = {"command": " ".join(sys.argv), "seed": seed, "sampler": sampler, "steps": steps}
    with ShowerWriter(output, format.value, geo, attrs) as writer:
        for chunk in iter_generate(model, geo, energies, particle=particle or geo.particle, n_steps=steps,
                                   sampler=sampler, seed=seed, batch_size=batch_size, digitise=digitise,
                                   device=resolve_device(device), progress=True):
            writer.append(chunk)
    typer.echo(f"wrote {len(energies)} generated showers in {geo.name} to {output} ({format.value})")


def main() -> None:
    """Entry point of the ``caloadapt`` console script."""
    app()


if __name__ == "__main__":
    main()
