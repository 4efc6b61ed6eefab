"""Grand Rounds command line (`grandrounds`)."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from core.errors import CaseDataError

console = Console()
err_console = Console(stderr=True)

app = typer.Typer(help="Grand Rounds: LLM agents consult on medical-imaging cases.", no_args_is_help=True,
                  pretty_exceptions_enable=False, add_completion=False)
cases_app = typer.Typer(help="Make and check case folders.", no_args_is_help=True)
app.add_typer(cases_app, name="cases")


def _progress() -> Progress:
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(), console=console)


@cases_app.command("generate")
def cases_generate(
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder to write case folders into.")],
    n: Annotated[int, typer.Option("--n", help="Number of cases.", min=1)] = 20,
    seed: Annotated[int, typer.Option(help="Cohort seed; case i is the same for a seed whatever n is.")] = 0,
    start: Annotated[int, typer.Option(help="Index of the first case (to extend a cohort).", min=0)] = 0,
    workers: Annotated[int, typer.Option(help="Processes generating in parallel.", min=1)] = 1,
    ct_size: Annotated[str, typer.Option(help="Thin-slice CT grid z,y,x.")] = "96,128,128",
    pathology_fraction: Annotated[float, typer.Option(min=0.0, max=1.0)] = 0.2,
    metal_rate: Annotated[float, typer.Option(min=0.0, max=1.0)] = 0.15,
    thick_rate: Annotated[float, typer.Option(min=0.0, max=1.0)] = 0.25,
    examples: Annotated[bool, typer.Option("--examples", help="Write the fixed example set instead.")] = False,
) -> None:
    """Generate a seeded synthetic cohort (chest CT + radiograph, pathology slides) with ground truth."""
    from core.synth.cohort import EXAMPLE_PLANS, CohortOptions, generate_cohort, generate_examples

    try:
        shape = tuple(int(v) for v in ct_size.split(","))
        assert len(shape) == 3 and min(shape) >= 32 and shape[1] == shape[2]
    except (ValueError, AssertionError):
        raise typer.BadParameter("give three integers >= 32 with y == x (square pixels), e.g. 96,128,128",
                                 param_hint="--ct-size") from None
    t0 = time.perf_counter()
    total = len(EXAMPLE_PLANS) if examples else n
    with _progress() as prog:
        task = prog.add_task("generating cases", total=total)

        def tick(case) -> None:
            prog.advance(task)
            prog.console.log(f"{case.id}: {case.truth.diagnosis} [{', '.join(s.id for s in case.studies)}]")

        if examples:
            ids = generate_examples(out, on_case=tick)
        else:
            opts = CohortOptions.for_grid(shape, pathology_fraction=pathology_fraction, metal_rate=metal_rate,
                                 thick_rate=thick_rate)
            ids = generate_cohort(n, seed, out, opts, workers=workers, start=start, on_case=tick)
            prog.update(task, completed=total)
    dt = time.perf_counter() - t0
    console.print(f"{len(ids)} cases in {out} ({dt:.1f} s)")


@cases_app.command("validate")
def cases_validate(
    folder: Annotated[Path, typer.Argument(help="A case folder, or a folder of case folders.")],
    images: Annotated[bool, typer.Option("--images/--no-images", help="Also open every image.")] = True,
) -> None:
    """Check case folders: schema, paths, and that every image loads. One line per problem."""
    from core.validate import validate_cases

    n, problems = validate_cases(folder, check_images=images)
    for p in problems:
        console.print(str(p), markup=False, highlight=False, soft_wrap=True)
    if problems:
        err_console.print(f"{len(problems)} problem(s) in {n} case folder(s)")
        raise typer.Exit(1)
    console.print(f"{n} case folder(s) OK")


def main() -> None:
    try:
        app()
    except CaseDataError as e:  # bad input is a message, never a traceback
        err_console.print(f"error: {e}", markup=False, highlight=False)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
