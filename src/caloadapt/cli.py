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

    if input.resolve() == output.resolve():
        raise CaloadaptError(f"{output}: output would overwrite the input")
    with ShowerWriter(output, format.value, None) as writer:
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


def main() -> None:
    """Entry point of the ``caloadapt`` console script."""
    app()


if __name__ == "__main__":
    main()
