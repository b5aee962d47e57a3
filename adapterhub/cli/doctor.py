"""``adapterhub doctor [--json]``: the versions, device and compiler adapterhub finds, and what is wrong.

Exit code 0 when no known incompatibility is found, 1 when one is (each printed as one line saying what
to install).
"""
from __future__ import annotations

import click

from adapterhub.cli import output


def _render(report: dict) -> None:
    from rich.console import Console

    console = Console(soft_wrap=True)
    console.print(f"adapterhub {report['adapterhub']} on Python {report['python']} ({report['platform']})")
    differs = report["differs_from_tested"]
    output.table([{"package": name, "installed": version or "not installed",
                   "tested": report["tested"][name] or "", "": "differs" if name in differs else ""}
                  for name, version in report["packages"].items()],
                 ["package", "installed", "tested", ""], title="packages (tested: constraints.txt)")
    device, comp = report["device"], report["compile"]
    where = (f"cuda: {device['name']} x{device['count']} (CUDA {device['cuda_version']})" if device["cuda"]
             else f"{device['default']} ({device['threads']} threads)")
    console.print(f"device: {where}")
    console.print(f"compiled backend: {comp['backend']} ({comp['why']})")
    if report["conflicts"]:
        for line in report["conflicts"]:
            console.print(f"[bold red]problem:[/] {line}", highlight=False)
    else:
        console.print("no known incompatibility")


@click.command("doctor")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def doctor_cmd(as_json: bool):
    """Show package versions, the device, the compile backend and any known incompatibility."""
    from adapterhub.compat import environment_report

    report = environment_report()
    output.emit(report, as_json, _render)
    raise click.exceptions.Exit(1 if report["conflicts"] else 0)
