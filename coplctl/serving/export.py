"""``coplctl export RUN --format peft``: a lora-mode run as a peft adapter folder with a model card.

The folder holds

- ``adapter_config.json`` and ``adapter_model.safetensors``: the adapters inside the backbone, in peft's
  layout. A baseline's (or CoPL w/o MoLE's) plain LoRA loads with ``PeftModel.from_pretrained`` into
  ``AutoModel.from_pretrained(base_model_name_or_path)`` and gives exactly the run's hidden states.
  CoPL's mixture of LoRA experts has a ``peft_type`` starting ``COPL_MOLE`` and naming its loader: a plain
  peft load refuses it with that text (a LoRA load would silently drop the experts); :func:`load_peft` loads
  it with the experts registered as a peft custom module (:mod:`coplctl.copl.peft_mole`).
- ``coplctl_reward.safetensors`` and ``coplctl_reward.json``, the sidecar: every other trained tensor
  (the reward head, user tables, gates outside the backbone ...) with the run's names, the users in row
  order, the method and its config, the text format and pooling. The reward is
  ``head(pool(lm(format(prompt, response))))`` with the user's parts as the method defines them.
- ``README.md``: a model card with the data, metrics, backbone and its revision.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch

from coplctl.copl.peft_mole import MOLE_PEFT_TYPE, OLD_MOLE_PEFT_TYPES, load_mole, mole_adapters, mole_export_config
from coplctl.core.atomic import atomic_dir, refuse_overlap
from coplctl.core.errors import CoplError, DataError

ADAPTER_CONFIG, ADAPTER_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
SIDECAR, SIDECAR_WEIGHTS = "coplctl_reward.json", "coplctl_reward.safetensors"
FORMATS = ("peft", "hf")


def _revision(source: str) -> str | None:
    """The hub commit a hub id resolved to here (None for local paths or when not cached)."""
    if Path(source).exists():
        return None
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(source, "config.json")
    except Exception:  # a malformed id: no revision to record
        return None
    parts = Path(found).parts if isinstance(found, str) else ()
    return parts[parts.index("snapshots") + 1] if "snapshots" in parts else None


def backbone_info(method) -> dict:
    """Name, loadable id or path, revision and package of the run's backbone."""
    from importlib.metadata import PackageNotFoundError, version

    from coplctl.models.backbone import EMBEDDED, resolve

    name = method.config.backbone
    source, _ = resolve(name)
    source = HUB_IDS.get(name, source)  # an embedded backbone is a copy of a hub model: name that, not a local path
    info = {"name": name, "base_model_name_or_path": source, "revision": _revision(source),
            "license": LICENSES.get(name), "kind": method.backbone.kind, "max_length": method.backbone.max_length,
            "truncation": "prompt_start", "package": None}
    if name in EMBEDDED:
        pip = EMBEDDED[name].pip.split()[0]
        try:
            info["package"] = f"{pip}=={version(pip)}"
        except PackageNotFoundError:
            info["package"] = pip
    return info


#: the hub model an embedded backbone is an exact copy of (gemma-3-270m is not: it is dequantised from a Q4 GGUF)
HUB_IDS = {"minilm": "sentence-transformers/all-MiniLM-L6-v2"}
#: the licenses of the known base models (an export is a derivative of its base model)
LICENSES = {"minilm": "apache-2.0", "sentence-transformers/all-MiniLM-L6-v2": "apache-2.0", "gemma-3-270m": "gemma",
            "gemma-2b-it": "gemma", "gemma-7b-it": "gemma", "google/gemma-2b-it": "gemma", "google/gemma-7b-it": "gemma"}


def _split_state(method, tensors: dict | None = None) -> tuple[dict, dict, dict | None]:
    """(adapter tensors in peft's checkpoint names, the other trained tensors, MoLE spec or None) of
    ``tensors`` (default: the run's trained state). CoPL's experts become its peft custom module's tensors
    (:func:`coplctl.copl.peft_mole.mole_adapters`)."""
    from peft.tuners.lora import LoraModel

    from coplctl.models.trainer import trainable_state

    adapters, rest = {}, {}
    for name, value in (trainable_state(method.net) if tensors is None else tensors).items():
        if name.startswith("encoder.lm."):
            adapters["base_model.model." + name.removeprefix("encoder.lm.")] = value
        else:
            rest[name] = value
    spec = None
    if getattr(method.net, "mole", False):
        adapters, spec = mole_adapters(method, adapters)
    # the names peft saves and loads: the model's, less the adapter name where peft removes it
    return {LoraModel._remove_adapter_name_from_key(k, "default"): v for k, v in adapters.items()}, rest, spec


def _lora_config(method, source: str, revision: str | None, spec: dict | None) -> dict:
    """The adapter_config.json of the run's adapters, as a dict."""
    cfg = method.net.encoder.lm.peft_config["default"] if spec is None else mole_export_config(method, spec)
    cfg = dataclasses.replace(cfg, base_model_name_or_path=source, revision=revision, inference_mode=True)
    out = cfg.to_dict()
    out["target_modules"] = sorted(out["target_modules"]) if isinstance(out["target_modules"], (set, list)) \
        else out["target_modules"]
    if spec is not None:
        out["peft_type"] = MOLE_PEFT_TYPE
    return json.loads(json.dumps(out, default=lambda v: v.value if hasattr(v, "value") else str(v)))


def export_peft(run: str | Path, out: str | Path, *, force: bool = False) -> dict:
    """Write RUN (a lora-mode run) as a peft adapter folder at OUT; returns a summary."""
    from safetensors.torch import save_file

    from coplctl.models.reward import load_method

    run, out = Path(run), Path(out)
    refuse_overlap(out, {"the run": run})
    method = load_method(run)
    if getattr(method.config, "mode", None) != "lora":
        raise CoplError(f"{run} is a {getattr(method.config, 'mode', 'non-neural')}-mode {method.registry_name} run: "
                        f"its reward reads cached backbone features through a trained MLP, not adapters inside the "
                        f"backbone; a peft export needs a lora-mode run (coplctl train ... --mode lora)")
    encoder = getattr(method.net, "encoder", None)
    names = set(getattr(getattr(encoder, "lm", None), "peft_config", {}) or {})
    if not getattr(method.net, "mole", False) and names != {"default"}:
        raise CoplError(f"{run} is a {method.registry_name} run with {len(names) or 'no'} LoRA adapters "
                        f"({', '.join(sorted(names)) or 'none'}) in its backbone; a peft export takes one adapter "
                        f"(Oracle's one adapter per true group is not exported)")
    backbone = backbone_info(method)
    adapters, rest, spec = _split_state(method)
    config = _lora_config(method, backbone["base_model_name_or_path"], backbone["revision"], spec)
    from importlib.metadata import version

    config_used = dataclasses.asdict(method.config)
    for key in ("lr", "epochs", "batch_size"):  # None means the mode's default: record the value used
        if config_used.get(key) is None and hasattr(method.config, "get"):
            config_used[key] = method.config.get(key)
    sidecar = {"coplctl_version": version("coplctl"), "method": method.registry_name,
               "config": config_used, "sizes": method.sizes(), "users": method.user_ids,
               "backbone": backbone, "text_format": method.backbone.text_format,
               "pooling": "mean over real tokens" if backbone["kind"] == "encoder" else "last real token (right padding)",
               "mole": spec, "tensors": sorted(rest)}
    training = _read_optional(run / "training.json")
    evaluation = _read_optional(run / "evaluation.json")
    sidecar["routing"] = ((training or {}).get("metrics") or {}).get("routing")
    if spec is not None and not sidecar["routing"]:  # no training.json: the seen users' routing, without groups
        from coplctl.copl.mole import gate_routing

        seen = method.net_sizes.get("seen_users", len(method.user_ids))
        sidecar["routing"] = gate_routing(method.net.layers, method.net.user_table[:seen].detach(), warn=False)
    with atomic_dir(out, overwrite=force, marker=ADAPTER_CONFIG, kind="peft export") as tmp:
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        save_file({k: v.contiguous() for k, v in adapters.items()}, str(tmp / ADAPTER_WEIGHTS),
                  metadata={"format": "pt"})
        save_file({k: v.contiguous() for k, v in rest.items()}, str(tmp / SIDECAR_WEIGHTS), metadata={"format": "pt"})
        (tmp / SIDECAR).write_text(json.dumps(sidecar, indent=2) + "\n")
        from coplctl.serving.model_card import model_card

        (tmp / "README.md").write_text(model_card(sidecar, config, training, evaluation, run))
    return {"run": str(run), "out": str(out), "format": "peft", "method": method.registry_name,
            "peft_type": config["peft_type"], "adapter_tensors": len(adapters), "sidecar_tensors": len(rest),
            "users": len(method.user_ids), "backbone": backbone}


def _read_optional(path: Path) -> dict | None:
    from coplctl.core.files import read_json

    return read_json(path, what="run file") if path.is_file() else None


def load_peft(directory: str | Path, model: torch.nn.Module):
    """``model`` (the base transformers model) with the export's adapters, loaded through peft.

    A plain LoRA export is ``PeftModel.from_pretrained``; a CoPL MoLE export is built from its LoRA config
    with the experts registered as a peft custom module (:func:`coplctl.copl.peft_mole.load_mole`); any
    tensor not taken is an error, never a silent drop.
    """
    from peft import PeftModel

    from coplctl.core.files import read_json

    directory = Path(directory)
    saved = read_json(directory / ADAPTER_CONFIG, what="adapter config")
    if not (directory / ADAPTER_WEIGHTS).is_file():  # peft would fall back to a pickled adapter_model.bin
        raise DataError(directory / ADAPTER_WEIGHTS, "no such adapter weights file; only safetensors are read")
    if saved.get("peft_type") not in (MOLE_PEFT_TYPE, *OLD_MOLE_PEFT_TYPES):
        return PeftModel.from_pretrained(model, str(directory))
    spec = read_json(directory / SIDECAR, what="coplctl sidecar").get("mole")
    if not isinstance(spec, dict):
        raise CoplError(f"{directory / SIDECAR} has no 'mole' settings for this MoLE adapter")
    return load_mole(model, saved, spec, directory / ADAPTER_WEIGHTS)


def is_export(directory: Path) -> bool:
    """Whether ``directory`` holds a peft export of coplctl (:func:`export_peft`)."""
    return (directory / ADAPTER_CONFIG).is_file() and (directory / SIDECAR).is_file()


def load_export(directory: str | Path):
    """The method of a peft export (:func:`export_peft`), as :func:`coplctl.models.reward.load_method` gives a
    run's: it scores every exported user. The net is rebuilt from the sidecar (method, config, sizes, users);
    its tensors are found under the names the export gave them by exporting a fresh net's names (so the
    names are never inverted by hand) and loaded strictly. An export has neither the training responses nor
    CoPL's GCF run: new users can be adapted from texts, and CoPL needs its run for that."""
    import pandas as pd
    from safetensors.torch import load_file

    from coplctl.core.files import field, read_json
    from coplctl.core.registry import METHODS
    from coplctl.models.reward import make_config
    from coplctl.models.train_config import fp32_trainable
    from coplctl.models.trainer import load_trainable_state, trainable_state

    directory = Path(directory)
    side_path = directory / SIDECAR
    side = read_json(side_path, what="coplctl sidecar")
    name = field(side, "method", str, side_path)
    try:
        cls = METHODS.get(name)
        options = dict(field(side, "config", dict, side_path))
        backbone = field(side, "backbone", dict, side_path)
        if options.get("backbone") and not Path(options["backbone"]).exists() and Path(options["backbone"]).is_absolute():
            options["backbone"] = backbone.get("base_model_name_or_path")  # a path of the exporting machine
        method = cls(make_config(cls.Config, options, owner=f"method {name}"))
    except CoplError as e:
        raise CoplError(f"{side_path}: {e}") from None
    sizes = field(side, "sizes", dict, side_path)
    method.user_ids = field(side, "users", list, side_path)
    method.net_sizes = {k: v for k, v in sizes.items() if k != "users"}
    method.responses = pd.DataFrame({"response_id": pd.Series(dtype=str), "prompt": pd.Series(dtype=str),
                                     "text": pd.Series(dtype=str)})
    if hasattr(method, "gcf_dir"):
        method.gcf_dir = None
    method.backbone = method.load_backbone()
    torch.manual_seed(0)
    method.net = fp32_trainable(method.build_net(len(method.user_ids), method.net_sizes))
    own = list(trainable_state(method.net))
    markers = {n: torch.tensor([float(i)]) for i, n in enumerate(own)}
    adapters, rest, _ = _split_state(method, markers)
    found = {**load_file(str(directory / ADAPTER_WEIGHTS)), **load_file(str(directory / SIDECAR_WEIGHTS))}
    saved, missing = {}, []
    for exported, marker in {**adapters, **rest}.items():
        if marker.numel() == 1 and marker.dtype == torch.float32 and 0 <= int(marker) < len(own) \
                and float(marker) == int(marker):
            if exported not in found:
                missing.append(exported)
            else:
                saved[own[int(marker)]] = found[exported]
    if missing:
        raise DataError(directory, f"the export lacks {len(missing)} tensors of its {name} model (e.g. {missing[0]})")
    try:
        load_trainable_state(method.net, saved)
    except CoplError as e:
        raise DataError(directory, f"{e} (an export of another coplctl version?)") from None
    return method


def push_to_hub(directory: str | Path, repo_id: str, *, private: bool = False) -> str:
    """Upload an export folder to the Hugging Face hub; returns the repo URL. Needs a token and network."""
    from huggingface_hub import HfApi, get_token

    token = get_token()
    if not token:
        raise CoplError("--push-to-hub needs a Hugging Face token: run `hf auth login` or set HF_TOKEN "
                        f"(the export is in {directory})")
    api = HfApi(token=token)
    try:
        if private:  # create_repo(private=True, exist_ok=True) leaves an existing public repo public
            from huggingface_hub.utils import RepositoryNotFoundError

            try:
                public = not api.repo_info(repo_id).private
            except RepositoryNotFoundError:
                public = False
            if public:
                raise CoplError(f"--private: the hub repo {repo_id} exists and is public, and pushing would publish "
                                f"this export (user ids and paths included); make the repo private on the hub "
                                f"first, or push elsewhere (the export is in {directory})")
        url = api.create_repo(repo_id, private=private, exist_ok=True)
        api.upload_folder(repo_id=repo_id, folder_path=str(directory), commit_message="coplctl export")
    except CoplError:
        raise
    except Exception as e:  # network, permissions, bad id: one line, the export stays on disk
        raise CoplError(f"could not push {directory} to the hub as {repo_id} ({type(e).__name__}: "
                        f"{str(e).strip().splitlines()[0][:200] if str(e).strip() else 'no detail'}); "
                        f"the export is in {directory}") from None
    return str(url)
