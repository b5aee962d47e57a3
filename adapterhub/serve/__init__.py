"""``adapterhub serve``: an AUTOMATIC1111-compatible web API (``/sdapi/v1/...``) over one generator.

Clients of the webui's API (the ``webuiapi`` package, painting plugins, bots) talk to it unchanged:

    from adapterhub.sample.generator import Generator
    from adapterhub.serve.app import Service, create_app

    service = Service(Generator("tiny-sd1", backend="compiled"), adapter_dirs=["loras"])
    app = create_app(service)            # FastAPI; serve it with uvicorn, then service.close()

Modules: :mod:`.models` (the webui's request bodies), :mod:`.plan` (a request checked and planned as
generator requests), :mod:`.controls` (the ControlNet extension's units), :mod:`.jobs` (the queue, its worker,
progress, interrupt and an interrupted request's image so far), :mod:`.networks` (the LoRAs,
embeddings, hypernetworks and ControlNets offered), :mod:`.app` (the routes and the error shapes).
FastAPI and uvicorn are imported by :mod:`.app` only: the rest of adapterhub does not need them.
"""
