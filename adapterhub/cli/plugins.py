"""``adapterhub plugins [--json]``: every registered adapter type, captioner and backend."""
from __future__ import annotations

import click

from adapterhub.cli import output


def plugin_rows() -> list[dict]:
    from adapterhub.plugins import adapter_types, registered

    rows = []
    for name, t in adapter_types().items():
        src = t.source
        rows.append({"kind": "adapter type", "name": name, "description": t.description,
                     "capabilities": list(t.capabilities), "formats": list(t.formats),
                     "module": src.module if src else "", "distribution": src.distribution if src else "",
                     "builtin": bool(src and src.builtin)})
    for kind, hook in (("captioner", "adapterhub_captioners"), ("sampler backend", "adapterhub_sampler_backends")):
        for name, (obj, src) in registered(hook).items():
            rows.append({"kind": kind, "name": name, "description": getattr(obj, "description", ""),
                         "capabilities": [], "formats": [], "module": src.module,
                         "distribution": src.distribution, "builtin": src.builtin})
    return rows


@click.command("plugins")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def plugins_cmd(as_json: bool):
    """List registered adapter types, captioners and sampler backends, and where each comes from."""
    rows = plugin_rows()

    def render(rows):
        output.table([{**r, "capabilities": ", ".join(r["capabilities"]),
                       "from": "built in" if r["builtin"] else r["distribution"]} for r in rows],
                     ["name", "kind", "capabilities", "from", "description"], title="adapterhub plugins")

    output.emit(rows, as_json, render)
