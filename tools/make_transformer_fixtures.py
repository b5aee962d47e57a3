"""Write the Flux / SD3 LoRA fixtures of ``tests/data/transformer-wild/`` with the reference tools' own code.

Each file is written by the tool that users train with: its network class is built on the real
architecture (FLUX.1 dev, SD3.5 Medium: 19 + 38 / 24 blocks at the published widths) on the meta device,
so nothing large is allocated; the tool creates its LoRA modules (rank 1: the files stay small), the
LoRA tensors get seeded random values, and the tool's own save function writes the file. The tests never
run this script; they read what it wrote (``MANIFEST.tsv`` records the tool commits and sha256).

Usage (the tool repositories extracted anywhere outside the checkout)::

    .venv/bin/python tools/make_transformer_fixtures.py --out tests/data/transformer-wild \\
        --sd-scripts /tmp/tw/kohya-ss+sd-scripts --ai-toolkit /tmp/tw/ostris+ai-toolkit \\
        --x-flux /tmp/tw/XLabs-AI+x-flux [--commits sd-scripts=<sha> ai-toolkit=<sha> x-flux=<sha>]

LyCORIS comes from the installed ``lycoris-lora`` package, wrapped around diffusers'
``FluxTransformer2DModel`` as SimpleTuner does. Packages a tool imports but this environment lacks
(image I/O, quantisation kernels) are stubbed, never installed: the writers do not touch them.
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import importlib
import importlib.machinery
import importlib.metadata
import sys
import types
from pathlib import Path

import torch

SEED = 20261207
AI_TOOLKIT_STUBS = ("optimum", "optimum.quanto")  # quantised training only
SD_SCRIPTS_STUBS = ("library.lpw_stable_diffusion", "library.sdxl_lpw_stable_diffusion")
# never packages that diffusers / transformers probe with find_spec (bitsandbytes, optimum): a stub would
# read as installed
MISSING_OK = ("cv2", "imagesize", "voluptuous")


def stub_missing(names=MISSING_OK) -> None:
    """Empty modules for imports the writers never use, where the package is not installed."""
    for name in names:
        try:
            importlib.import_module(name)
        except Exception:  # noqa: BLE001 - any import failure: the module is only imported, never used
            stub(name)


def stub(name: str) -> None:
    """``name`` imports as an empty module (its attributes are inert stand-ins)."""
    module = types.ModuleType(name)
    module.__spec__ = importlib.machinery.ModuleSpec(name, None)  # find_spec probes must not fail on it
    module.__getattr__ = lambda attr, _n=name: _stub_attr(_n, attr)
    sys.modules[name] = module


def _stub_attr(module: str, attr: str):
    if attr.startswith("__"):  # inspect / pickle probe dunders: a stub has none
        raise AttributeError(attr)
    return _Anything(f"{module}.{attr}")


class _Anything:
    """A stand-in for attributes of a stubbed module (class bases, decorators, constants)."""

    def __init__(self, name):
        self.name = name

    def __call__(self, *a, **k):
        return _Anything(self.name + "()")

    def __getattr__(self, attr):
        if attr.startswith("__"):
            raise AttributeError(attr)
        return _Anything(f"{self.name}.{attr}")

    def __mro_entries__(self, bases):
        return (object,)


def import_stubbing(module: str, limit: int = 40):
    """Import ``module``, stubbing each package it imports that is not installed (a trainer's image,
    audio, logging and UI dependencies: the network and save code never call them)."""
    for _ in range(limit):
        try:
            return importlib.import_module(module)
        except ModuleNotFoundError as e:
            if not e.name or e.name in sys.modules:
                raise
            print(f"  stubbed {e.name} (not installed)", flush=True)
            stub(e.name)
            for name in [n for n in sys.modules if n == module or n.startswith(module.split(".")[0] + ".")]:
                sys.modules.pop(name, None)  # a half-imported package re-imports cleanly
    raise RuntimeError(f"{module}: too many missing imports")


@contextlib.contextmanager
def on_path(repo: Path, stubs=()):
    """Import the tool's modules from its extracted tree (and forget them afterwards: two tools both
    have a ``library`` / ``toolkit`` package); ``stubs``: its modules that only the trainer uses and
    that need packages of other versions (sd-scripts' long-prompt pipelines)."""
    before = set(sys.modules)
    sys.path.insert(0, str(repo))
    for name in stubs:
        stub(name)
    try:
        yield
    finally:
        sys.path.remove(str(repo))
        for name in (set(sys.modules) - before) | set(stubs):
            if name.split(".")[0] in ("library", "networks", "toolkit", "src", "image_datasets", "jobs", "extensions",
                                      "optimum"):
                sys.modules.pop(name, None)


def seeded(params, seed: int) -> None:
    """Fill every LoRA tensor with seeded random values (an up of zeros, as tools initialise it, would
    hide a wrong row split)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.copy_((torch.randn(p.shape, generator=gen) * 0.05).to(p.dtype))


# ---------------------------------------------------------------------------------------------
# text encoders at the published sizes, on the meta device
# ---------------------------------------------------------------------------------------------
def clip_l(projection: bool = False):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cfg = CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                         projection_dim=768, hidden_act="quick_gelu")
    with torch.device("meta"):
        model = (CLIPTextModelWithProjection if projection else CLIPTextModel)(cfg)
    if not projection and not hasattr(model, "text_model"):
        model = _TextModel(model)
    return model


class _TextModel(torch.nn.Module):
    """transformers 5's ``CLIPTextModel`` holds the encoder directly; the tools pin transformers 4, whose
    ``CLIPTextModel`` nests it under ``text_model`` (the module names users' files carry:
    ``lora_te1_text_model_encoder_layers_0_...``). This restores that path."""

    def __init__(self, inner):
        super().__init__()
        self.text_model = inner


def clip_g():
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    cfg = CLIPTextConfig(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                         projection_dim=1280, hidden_act="gelu")
    with torch.device("meta"):
        return CLIPTextModelWithProjection(cfg)


def t5_xxl():
    from transformers import T5Config, T5EncoderModel

    cfg = T5Config(d_model=4096, d_ff=10240, d_kv=64, num_heads=64, num_layers=24, feed_forward_proj="gated-gelu",
                   vocab_size=32128)
    with torch.device("meta"):
        return T5EncoderModel(cfg)


# ---------------------------------------------------------------------------------------------
# kohya sd-scripts
# ---------------------------------------------------------------------------------------------
def sd_scripts_flux(repo: Path, out: Path, name: str, seed: int, te: bool = False, t5: bool = False, **kwargs) -> str:
    """sd-scripts' ``networks.lora_flux``: ``create_network`` on FLUX.1 dev, ``save_weights`` in bfloat16
    with the modelspec metadata its trainer writes."""
    with on_path(repo, SD_SCRIPTS_STUBS):
        from library import flux_models, sai_model_spec
        from networks import lora_flux

        with torch.device("meta"):
            flux = flux_models.Flux(flux_models.configs["dev"].params)
        encoders = [clip_l(), t5_xxl() if t5 else None]
        if t5:
            kwargs["train_t5xxl"] = "True"
        network = lora_flux.create_network(1.0, 1, 1.0, None, encoders, flux, **kwargs)
        network.apply_to(encoders, flux, apply_text_encoder=te or t5, apply_unet=True)
        seeded(network.parameters(), seed)
        meta = sai_model_spec.build_metadata(None, False, False, False, True, False, 0.0, title=name,
                                             model_config={"flux": "dev"})
        network.save_weights(str(out / name), torch.bfloat16, meta)
    return f"networks.lora_flux.create_network({options(kwargs, te=te or t5)}) + LoRANetwork.save_weights"


# sd-scripts' SD3Params as its sd3_utils.analyze_state_dict_state reads them from the published checkpoints
SD35_MEDIUM_SAI = dict(patch_size=2, depth=24, num_patches=384 * 384, pos_embed_max_size=384, adm_in_channels=2048,
                       qk_norm="rms", x_block_self_attn_layers=list(range(13)), context_embedder_in_features=4096,
                       context_embedder_out_features=1536, model_type="5-medium")
SD35_LARGE_SAI = dict(patch_size=2, depth=38, num_patches=192 * 192, pos_embed_max_size=192, adm_in_channels=2048,
                      qk_norm="rms", x_block_self_attn_layers=[], context_embedder_in_features=4096,
                      context_embedder_out_features=2432, model_type="5-large")


def sd_scripts_sd3(repo: Path, out: Path, name: str, seed: int, te: bool = False, large: bool = False,
                   **kwargs) -> str:
    """sd-scripts' ``networks.lora_sd3`` on SD3.5 Medium's MMDiT (24 joint blocks, the first 13 with a
    second attention) or SD3.5 Large's (38), with CLIP-L and CLIP-G when ``te``, saved in bfloat16 with
    the trainer's modelspec metadata."""
    with on_path(repo, SD_SCRIPTS_STUBS):
        from library import sai_model_spec, sd3_models
        from networks import lora_sd3

        params = sd3_models.SD3Params(**(SD35_LARGE_SAI if large else SD35_MEDIUM_SAI))
        with torch.device("meta"):
            mmdit = sd3_models.create_sd3_mmdit(params)
        encoders = [clip_l(projection=True), clip_g()]
        network = lora_sd3.create_network(1.0, 1, 1.0, None, encoders, mmdit, **kwargs)
        network.apply_to(encoders, mmdit, apply_text_encoder=te, apply_unet=True)
        seeded(network.parameters(), seed)
        meta = sai_model_spec.build_metadata(None, False, False, False, True, False, 0.0, title=name,
                                             model_config={"sd3": "5-large" if large else "5-medium"})
        network.save_weights(str(out / name), torch.bfloat16, meta)
    return f"networks.lora_sd3.create_network({options(kwargs, te=te, large=large)}) + LoRANetwork.save_weights"


# ---------------------------------------------------------------------------------------------
# XLabs x-flux
# ---------------------------------------------------------------------------------------------
FLUX_DEV_BFL = dict(in_channels=64, vec_in_dim=768, context_in_dim=4096, hidden_size=3072, mlp_ratio=4.0,
                    num_heads=24, depth=19, depth_single_blocks=38, axes_dim=[16, 56, 56], theta=10_000,
                    qkv_bias=True, guidance_embed=True)  # x-flux's configs["flux-dev"].params (its util.py
# imports every annotator and optimum.quanto at module level, so the numbers are restated here)


def x_flux(repo: Path, out: Path, name: str, seed: int, double=(), single=()) -> str:
    """x-flux's trainer (``train_flux_lora_deepspeed.py``): ``DoubleStreamBlockLoraProcessor`` /
    ``SingleStreamBlockLoraProcessor`` (dim 3072) set on the chosen blocks (its ``--double_blocks`` /
    ``--single_blocks``), the model cast to float32 as the trainer does, and its save: the ``_lora``
    entries of the state dict through ``safetensors.torch.save_file``."""
    from safetensors.torch import save_file

    with on_path(repo):
        from src.flux.model import Flux, FluxParams
        from src.flux.modules.layers import DoubleStreamBlockLoraProcessor, SingleStreamBlockLoraProcessor

        with torch.device("meta"):
            dit = Flux(FluxParams(**FLUX_DEV_BFL))
        procs = {}
        for proc_name, proc in dit.attn_processors.items():
            index = int(proc_name.split(".")[1])
            if proc_name.startswith("double_blocks") and index in double:
                procs[proc_name] = DoubleStreamBlockLoraProcessor(dim=3072, rank=1)
            elif proc_name.startswith("single_blocks") and index in single:
                procs[proc_name] = SingleStreamBlockLoraProcessor(dim=3072, rank=1)
            else:
                procs[proc_name] = proc
        dit.set_attn_processor(procs)
        dit = dit.to(torch.float32)
        seeded([p for n, p in dit.named_parameters() if "_lora" in n], seed)
        state = dit.state_dict()
        save_file({k: state[k] for k in state if "_lora" in k}, str(out / name))
    return (f"DoubleStreamBlockLoraProcessor / SingleStreamBlockLoraProcessor on double_blocks {list(double)} and "
            f"single_blocks {list(single)} + the trainer's save_file of the _lora entries")


# ---------------------------------------------------------------------------------------------
# ostris ai-toolkit
# ---------------------------------------------------------------------------------------------
FLUX_DEV_DIFFUSERS = dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                          num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768,
                          guidance_embeds=True, axes_dims_rope=(16, 56, 56))


def flux_transformer():
    import diffusers

    with torch.device("meta"):
        return diffusers.FluxTransformer2DModel(**FLUX_DEV_DIFFUSERS)


def ai_toolkit(repo: Path, out: Path, name: str, seed: int, only_if_contains=None, network_type: str = "lora",
               lokr_factor: int = -1) -> str:
    """ai-toolkit's ``LoRASpecialNetwork`` as its trainer builds it for FLUX.1 (``is_flux``: PEFT names under
    ``transformer.``, transformer blocks only), ``apply_to``, ``save_weights`` in float16 (its default
    save dtype); ``only_if_contains`` is its network option that picks the modules. ``network_type`` lokr:
    its LokrModule with ``lokr_factor``, in the PEFT-style names it writes unless ``old_lokr_format``."""
    import diffusers  # noqa: F401 - imported before the stubs: it probes for optimum itself
    import transformers  # noqa: F401

    with on_path(repo, AI_TOOLKIT_STUBS):
        LoRASpecialNetwork = import_stubbing("toolkit.lora_special").LoRASpecialNetwork

        transformer = flux_transformer()
        network = LoRASpecialNetwork(text_encoder=[clip_l(), t5_xxl()], unet=transformer, lora_dim=1, alpha=1,
                                     multiplier=1.0, train_unet=True, train_text_encoder=False, is_flux=True,
                                     transformer_only=True, network_type=network_type,
                                     only_if_contains=only_if_contains,
                                     network_config=types.SimpleNamespace(lokr_factor=lokr_factor,
                                                                          old_lokr_format=False))
        network.apply_to(None, transformer, False, True)
        seeded(network.parameters(), seed)
        network.save_weights(str(out / name), torch.float16, {"software": "ai-toolkit"})
    return (f"toolkit.lora_special.LoRASpecialNetwork(is_flux, network_type={network_type}, "
            f"only_if_contains={only_if_contains}) + save_weights")


# ---------------------------------------------------------------------------------------------
# LyCORIS, as SimpleTuner wraps diffusers' FluxTransformer2DModel
# ---------------------------------------------------------------------------------------------
def lycoris(out: Path, name: str, seed: int, algo: str, preset: dict, **kwargs) -> str:
    """``lycoris.create_lycoris`` on diffusers' Flux transformer with ``LycorisNetwork.apply_preset`` (as
    SimpleTuner's ``lycoris_config.json`` does), ``apply_to``, ``save_weights`` in bfloat16. LyCORIS makes
    its own tensors on the CPU whatever device the wrapped weights are on (its buffers, ``alpha`` and the
    ``scalar`` it multiplies into ``hada_w1_a`` / ``lokr_w1`` on save, keep their values)."""
    from lycoris import LycorisNetwork, create_lycoris

    transformer = flux_transformer()
    LycorisNetwork.apply_preset(preset)
    network = create_lycoris(transformer, 1.0, linear_dim=1, linear_alpha=1, algo=algo, **kwargs)
    network.apply_to()
    seeded(network.parameters(), seed)
    network.save_weights(str(out / name), torch.bfloat16, {"lycoris_config": str(preset)})
    return f"LycorisNetwork.apply_preset({preset}) + lycoris.create_lycoris(algo={algo}) + save_weights"


# ---------------------------------------------------------------------------------------------
# diffusers / PEFT: diffusers' Flux DreamBooth LoRA script
# ---------------------------------------------------------------------------------------------
SD35_MEDIUM_DIFFUSERS = dict(sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24,
                             attention_head_dim=64, num_attention_heads=24, joint_attention_dim=4096,
                             caption_projection_dim=1536, pooled_projection_dim=2048, pos_embed_max_size=384,
                             dual_attention_layers=tuple(range(13)), qk_norm="rms_norm")
# train_dreambooth_lora_sd3.py's default targets (attention, attn2, context projections) on the first and
# last joint block
SD3_DIFFUSERS_TARGETS = (r"transformer_blocks\.(0|23)\.(attn2?\.(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|"
                         r"add_v_proj|to_add_out)|ff\.net\.0\.proj|ff\.net\.2)")


# the script's --lora_layers default (attention, MLPs) on the first double and last single block
DIFFUSERS_TARGETS = (r"(transformer_blocks\.0\.(attn\.(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj|"
                     r"to_add_out)|ff\.net\.0\.proj|ff\.net\.2|ff_context\.net\.0\.proj|ff_context\.net\.2)|"
                     r"single_transformer_blocks\.37\.(attn\.(to_q|to_k|to_v)|proj_mlp|proj_out))")


def diffusers_peft(out: Path, name: str, seed: int, target_modules: str, sd3: bool = False) -> str:
    """What ``train_dreambooth_lora_flux.py`` does: ``transformer.add_adapter(LoraConfig(...))``,
    ``get_peft_model_state_dict`` and ``FluxPipeline.save_lora_weights`` (bfloat16 training weights).
    The adapter is made on the meta device with the transformer; only its LoRA tensors are given
    memory. ``target_modules``: PEFT's full-match pattern (the script's module list, on chosen blocks)."""
    import diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    if sd3:  # train_dreambooth_lora_sd3.py: the same calls on SD3's transformer and pipeline
        with torch.device("meta"):
            transformer = diffusers.SD3Transformer2DModel(**SD35_MEDIUM_DIFFUSERS)
    else:
        transformer = flux_transformer()
    transformer.add_adapter(LoraConfig(r=1, lora_alpha=1, init_lora_weights="gaussian", target_modules=target_modules))
    params = []
    for module_name, module in transformer.named_modules():
        if module_name.endswith((".lora_A.default", ".lora_B.default")):
            module.to_empty(device="cpu")
            module.to(torch.bfloat16)
            params += list(module.parameters())
    seeded(params, seed)
    pipeline = diffusers.StableDiffusion3Pipeline if sd3 else diffusers.FluxPipeline
    pipeline.save_lora_weights(str(out), transformer_lora_layers=get_peft_model_state_dict(transformer),
                                             weight_name=name)
    return (f"transformer.add_adapter(target_modules={target_modules}) + get_peft_model_state_dict + "
            f"{pipeline.__name__}.save_lora_weights")


# ---------------------------------------------------------------------------------------------
# the runs: (file, preset it binds to, base it reports, layout, adapter type, tool, writer); a file with neither a
# guidance-embedder module nor modelspec metadata reports ``flux`` (dev and schnell share every other shape)
# ---------------------------------------------------------------------------------------------
def runs(args):
    sd = Path(args.sd_scripts) if args.sd_scripts else None
    out = []
    if sd:
        out += [
            ("sdscripts_flux_double_te1.safetensors", "flux-dev", "flux-dev", "kohya", "lora", "sd-scripts",
             lambda n, s: sd_scripts_flux(sd, args.out, n, s, te=True, train_blocks="double",
                                          in_dims="[1,1,1,1,1]")),
            ("sdscripts_flux_single.safetensors", "flux-dev", "flux-dev", "kohya", "lora", "sd-scripts",
             lambda n, s: sd_scripts_flux(sd, args.out, n, s, train_blocks="single")),
            # split_qkv on a double block fails in create_network at this commit (it unpacks three split
            # sizes into one name): only single blocks are split
            ("sdscripts_flux_splitqkv_t5.safetensors", "flux-dev", "flux-dev", "kohya", "lora", "sd-scripts",
             lambda n, s: sd_scripts_flux(sd, args.out, n, s, t5=True, split_qkv="True",
                                          train_double_block_indices="none", train_single_block_indices="0,37",
                                          network_reg_dims=r"lora_te3_encoder_block_([1-9]|1\d|2\d)_=0")),
            ("sdscripts_sd35m_te.safetensors", "sd3.5-medium", "sd3.5-medium", "kohya", "locon", "sd-scripts",
             lambda n, s: sd_scripts_sd3(sd, args.out, n, s, te=True, emb_dims="[1,1,1,1,1,1]")),
            ("sdscripts_sd35l_blocks.safetensors", "sd3.5-large", "sd3.5-large", "kohya", "locon", "sd-scripts",
             lambda n, s: sd_scripts_sd3(sd, args.out, n, s, large=True, train_block_indices="0,37",
                                         emb_dims="[1,1,1,1,1,1]")),
        ]
    if args.x_flux:
        xf = Path(args.x_flux)
        out.append(("xflux.safetensors", "flux-dev", "flux", "xlabs", "lora", "x-flux",
                    lambda n, s: x_flux(xf, args.out, n, s, double=(0, 18), single=(0, 37))))
    if args.ai_toolkit:
        ai = Path(args.ai_toolkit)
        out.append(("aitoolkit.safetensors", "flux-dev", "flux", "diffusers", "lora", "ai-toolkit",
                    lambda n, s: ai_toolkit(ai, args.out, n, s, only_if_contains=[
                        "transformer_blocks.0.", "transformer_blocks.18.", "single_transformer_blocks.37."])))
        out.append(("aitoolkit_lokr.safetensors", "flux-dev", "flux", "diffusers", "lokr", "ai-toolkit",
                    lambda n, s: ai_toolkit(ai, args.out, n, s, network_type="lokr", lokr_factor=16, only_if_contains=[
                        "transformer_blocks.0.", "single_transformer_blocks.37."])))
    if args.lycoris:
        out += [
            ("lycoris_lokr.safetensors", "flux-dev", "flux", "lycoris", "lokr", "lycoris-lora",
             lambda n, s: lycoris(args.out, n, s, "lokr", {"target_module": ["FluxAttention", "FeedForward"],
                                                         "module_algo_map": {"FluxAttention": {"factor": 16},
                                                                             "FeedForward": {"factor": 8}}},
                                  factor=16)),
            ("lycoris_loha.safetensors", "flux-dev", "flux", "lycoris", "loha", "lycoris-lora",
             lambda n, s: lycoris(args.out, n, s, "loha", {"target_module": ["FluxAttention", "FeedForward"],
                                                         "target_name": [], "use_fnmatch": True,
                                                         "exclude_name": ["*transformer_blocks.[1-9]*"]})),
        ]
    if args.diffusers:
        out.append(("diffusers_peft.safetensors", "flux-dev", "flux", "diffusers", "lora", "diffusers",
                    lambda n, s: diffusers_peft(args.out, n, s, DIFFUSERS_TARGETS)))
        out.append(("diffusers_sd35m_peft.safetensors", "sd3.5-medium", "sd3.5-medium", "diffusers", "lora",
                    "diffusers",
                    lambda n, s: diffusers_peft(args.out, n, s, SD3_DIFFUSERS_TARGETS, sd3=True)))
    return out


def options(kwargs: dict, **flags) -> str:
    """The tool options a file was written with, for the manifest."""
    chosen = {**{k: v for k, v in flags.items() if v}, **kwargs}
    return ", ".join(f"{k}={v}" for k, v in chosen.items())


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--sd-scripts")
    parser.add_argument("--ai-toolkit")
    parser.add_argument("--x-flux")
    parser.add_argument("--lycoris", action="store_true", help="also the LyCORIS files (installed lycoris-lora)")
    parser.add_argument("--diffusers", action="store_true", help="also the diffusers / PEFT file (installed)")
    parser.add_argument("--commits", nargs="*", default=[], help="tool=commit, recorded in the manifest")
    parser.add_argument("--only", nargs="*", help="file names to (re)write; the manifest keeps the others")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    commits = dict(c.split("=", 1) for c in args.commits)
    stub_missing()
    manifest = args.out / "MANIFEST.tsv"
    header = "file\tpreset\tbase\tlayout\ttype\ttool\ttool_commit\thow\tsize\tsha256"
    rows = {}
    if manifest.exists():
        for line in manifest.read_text().splitlines()[1:]:
            rows[line.split("\t")[0]] = line
    for package in ("lycoris-lora", "diffusers"):  # the installed writers: their version is the commit
        commits.setdefault(package, f"{package}=={importlib.metadata.version(package)}")
    for i, (name, preset, base, layout, kind, tool, write) in enumerate(runs(args)):
        if args.only and name not in args.only:
            continue
        function = write(name, SEED + i)
        path = args.out / name
        how = f"written by {tool} {function} at rank 1, random values"
        rows[name] = "\t".join([name, preset, base, layout, kind, tool, commits.get(tool, ""), how,
                                str(path.stat().st_size), sha256(path)])
        print(f"{name}: {path.stat().st_size} bytes", flush=True)
    manifest.write_text("\n".join([header, *sorted(rows.values())]) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
