"""The model card (README.md) of an exported run: what it is, how to load it, data, metrics, backbone."""

from __future__ import annotations

import json
from pathlib import Path


def _pct(value) -> str:
    return f"{100 * value:.2f}" if isinstance(value, (int, float)) and value == value else "n/a"


def _front_matter(sidecar: dict, config: dict) -> str:
    base = sidecar["backbone"]["base_model_name_or_path"]
    lines = ["---", "library_name: peft", "tags:", "- reward-model", "- personalized-reward", "- coplctl",
             f"- {sidecar['method']}"]
    if not Path(base).is_absolute():  # a hub id: the hub links the card to its base model
        lines.append(f"base_model: {base}")
    lines.append(f"license: {sidecar['backbone'].get('license') or 'other'}")  # the base model's
    return "\n".join(lines + ["---", ""])


def _loading(sidecar: dict, config: dict) -> str:
    """The card's loading section: a snippet that computes rewards (tests run it) and what it needs."""
    base, mole = sidecar["backbone"]["base_model_name_or_path"], sidecar["mole"] is not None
    if mole:
        imports = ("from coplctl.copl.mole import Routing, mole_routing\nfrom coplctl.copl.peft_mole import mole_layers\n"
                   "from coplctl.serving.export import load_peft\n\n")
        load = "model = load_peft(folder, AutoModel.from_pretrained(base)).eval()"
        run = ("rows = torch.tensor([side[\"users\"].index(u) for u in users])\n"
               "routing = Routing(tensors[\"user_table\"][rows], torch.arange(len(rows)))  # one user row per text\n"
               "with torch.no_grad(), mole_routing(mole_layers(model), routing):\n")
        note = ("CoPL's mixture of LoRA experts: a plain `PeftModel.from_pretrained` refuses it (its `peft_type` names "
                "the loader), because a LoRA load would drop the experts. `coplctl.serving.export.load_peft` "
                "registers the experts as a peft custom LoRA module and loads every tensor (needs `pip install "
                "coplctl`); each user's embedding (`user_table`) picks the experts.")
    else:
        imports, run = "from peft import PeftModel\n\n", "with torch.no_grad():\n"
        load = "model = PeftModel.from_pretrained(AutoModel.from_pretrained(base), folder).eval()"
        note = "A plain LoRA adapter: peft loads it as is; no coplctl is needed."
    pool = ("pooled = hidden[torch.arange(len(texts)), mask.sum(1) - 1]  # the last real token"
            if sidecar["backbone"]["kind"] == "decoder" else
            "pooled = (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)  # the mean over real tokens")
    code = ("import json\n\nimport torch\nfrom safetensors.torch import load_file\n"
            "from transformers import AutoModel, AutoTokenizer\n" + imports +
            f"folder, base = \"THIS_FOLDER\", {base!r}\n"
            "side = json.load(open(f\"{folder}/coplctl_reward.json\"))\n"
            "tensors = load_file(f\"{folder}/coplctl_reward.safetensors\")  # the head (and user table)\n"
            "tok = AutoTokenizer.from_pretrained(base)\n"
            "tok.padding_side, tok.pad_token = \"right\", tok.pad_token or tok.eos_token\n"
            f"{load}\n\n"
            "users, prompts, responses = [side[\"users\"][0]], [\"Hi?\"], [\"Hello!\"]\n"
            "texts = [side[\"text_format\"].format(prompt=p, response=r) for p, r in zip(prompts, responses)]\n"
            "batch = tok(texts, padding=True, return_tensors=\"pt\")\n"
            f"{run}    hidden = model(**batch).last_hidden_state\n"
            f"mask = batch[\"attention_mask\"]\n{pool}\n"
            "rewards = (pooled @ tensors[\"head.weight\"].T + tensors[\"head.bias\"]).squeeze(-1)")
    if sidecar["method"] not in ("uniform", "copl"):
        note += (f" The snippet gives `head(pool(hidden))`; coplctl's `{sidecar['method']}` computes its reward from "
                 "`pool(hidden)` with its user parameters (e.g. a user token after the first token), from the "
                 "sidecar's tensors: load the run with coplctl for that.")
    return (f"{note}\n\n```python\n{code}\n```\n\n"
            f"Texts are formatted as `{json.dumps(sidecar['text_format'])}`, pooling the {sidecar['pooling']}; a text "
            f"longer than {sidecar['backbone']['max_length']} tokens is cut by coplctl from the start of its prompt "
            "(`coplctl.models.tokens.encode`), which plain tokenization does not do. The reward head and user "
            "parameters are in `coplctl_reward.safetensors` (names as in the coplctl run); `coplctl_reward.json` "
            "lists the users in row order and the method's full config.\n")


def _routing(stats: dict | None) -> list[str]:
    """CoPL's routing diagnostics from training (:func:`coplctl.copl.mole.routing_stats`), as card lines."""
    if not stats:
        return []
    lines = ["", "## Routing\n", "How the gates spread the seen users over the experts at the end of training (top-1 "
             "expert per user; a layer is collapsed when one expert takes >= 95% of users: its gate then ignores the "
             "user embedding):\n", "| layer | most used expert | its share | collapsed | I(group; expert) / H(group) |",
             "|---|---|---|---|---|"]
    for name, s in stats.items():
        nmi = s.get("normalized_mi")
        lines.append(f"| `{name}` | {s.get('top_expert')} | {_pct(s.get('top_share'))}% | "
                     f"{'yes' if s.get('collapsed') else 'no'} | {'n/a' if nmi is None else f'{nmi:.2f}'} |")
    bad = [n for n, s in stats.items() if s.get("collapsed")]
    if bad:
        lines += ["", f"**Warning:** {len(bad)} of {len(stats)} layers collapsed during training; in them every user "
                  "gets the same experts."]
    return lines


def model_card(sidecar: dict, config: dict, training: dict | None, evaluation: dict | None, run: Path) -> str:
    """README.md text of an export."""
    b = sidecar["backbone"]
    parts = [_front_matter(sidecar, config), f"# {sidecar['method']} personalized reward model (coplctl)\n",
             f"A personalized reward model r(user, prompt, response) trained with coplctl "
             f"{sidecar['coplctl_version']} (method `{sidecar['method']}`), exported from `{run}` "
             f"for {len(sidecar['users'])} users.\n", "## Loading\n", _loading(sidecar, config), "## Backbone\n",
             f"- name: `{b['name']}`", f"- base model: `{b['base_model_name_or_path']}`",
             f"- revision: `{b['revision'] or 'not recorded (a local path)'}`"]
    if b.get("package"):
        parts.append(f"- shipped by the PyPI package `{b['package']}`")
    parts += [f"- max length: {b['max_length']} tokens, {b['kind']}; a longer formatted text loses the start of its "
              f"prompt first, its response only when that does not fit alone (`coplctl.models.tokens.encode`)",
              f"- adapters: `{config['peft_type']}`, rank {config['r']}, alpha {config['lora_alpha']}, "
              f"targets {', '.join(config['target_modules'] if isinstance(config['target_modules'], list) else [str(config['target_modules'])])}",
              ""]
    parts.append("## Data\n")
    if training:
        meta = training.get("data_meta") or {}
        parts += [f"- dataset: `{training.get('data')}`", f"- source: {meta.get('source')}, variant: "
                  f"{meta.get('variant')}, annotations: {meta.get('annotations')}, seed: {meta.get('seed')}"]
        counts = meta.get("counts") or {}
        if counts:
            parts.append("- counts: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
        parts.append(f"- training seed: {training.get('seed')}")
    else:
        parts.append("- not recorded (the run has no training.json)")
    parts += ["", "## Metrics\n"]
    metrics = (training or {}).get("metrics") or {}
    if metrics:
        parts.append(f"- best validation pair accuracy: {_pct(metrics.get('valid_accuracy'))} "
                     f"(epoch {metrics.get('best_epoch')}, {metrics.get('steps')} optimizer steps)")
    if evaluation:
        for who in ("seen", "unseen"):
            res = (evaluation.get("metrics") or {}).get(who) or {}
            if isinstance(res, dict) and "accuracy" in res:
                n, c = res.get("pairs"), res.get("controversial_pairs")
                parts.append(f"- {who} users' test accuracy: {_pct(res.get('accuracy'))} on {n} test pairs of "
                             f"`{evaluation.get('data')}` (controversial: {_pct(res.get('controversial'))} on {c} pairs)")
    if not metrics and not evaluation:
        parts.append("- none recorded")
    parts += _routing(sidecar.get("routing"))
    parts += ["", "## Training config\n", "```json", json.dumps(sidecar["config"], indent=2, sort_keys=True), "```", ""]
    return "\n".join(parts)


def hf_card(record: dict, backbone: dict, run: Path) -> str:
    """README.md of an hf export (:mod:`coplctl.serving.hf_export`): whose reward, how to load it with transformers
    alone, and how TRL and OpenRLHF take it."""
    base = backbone["base_model_name_or_path"]
    lines = ["---", "library_name: transformers", "pipeline_tag: text-classification", "tags:", "- reward-model",
             "- personalized-reward", "- coplctl", f"- {record['method']}"]
    if not Path(base).is_absolute():
        lines.append(f"base_model: {base}")
    lines += [f"license: {backbone.get('license') or 'other'}", "---", ""]
    routing = record.get("experts")
    parts = ["\n".join(lines), f"# {record['method']} reward of {record['reward_of']} (coplctl)\n",
             f"The reward of {record['reward_of']} from the coplctl run `{run}`, frozen into a standard "
             f"sequence-classification model: its adapters{' and the experts the user is routed to' if routing else ''} "
             "are merged into the weights and the reward head is the `score` layer. Plain transformers loads it.\n",
             "## Loading\n", "```python", "import torch",
             "from transformers import AutoModelForSequenceClassification, AutoTokenizer", "",
             'tok = AutoTokenizer.from_pretrained("THIS_FOLDER")',
             'model = AutoModelForSequenceClassification.from_pretrained("THIS_FOLDER")',
             'chat = [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]',
             "text = tok.apply_chat_template(chat, tokenize=False)  # formatted as " + json.dumps(record["text_format"]),
             "with torch.no_grad():",
             '    reward = model(**tok(text, return_tensors="pt", truncation=True)).logits[0, 0]', "```", "",
             f"The logit is the run's reward minus the head's bias, {record['reward_offset']:.6g} (`coplctl.reward_offset` "
             "in config.json): the same constant for every text, which Bradley-Terry training never changes. "
             f"Texts longer than {record['max_length']} tokens lose their start (coplctl cuts the prompt's start "
             "first, the response only when it does not fit alone; for such texts the two can differ).\n",
             "As TRL's reward model: pass the folder (or this model) where TRL takes a reward model, e.g. "
             "`reward_funcs=\"THIS_FOLDER\"` of `GRPOTrainer` or `reward_model=` of the PPO/RLOO trainers. "
             "As OpenRLHF's: `--reward_pretrain THIS_FOLDER`.\n"]
    if routing:
        parts += ["## Routing\n", "The experts the user's gate picks in each layer (weights are the gate's probabilities):\n"]
        parts += [f"- `{name}`: " + ", ".join(f"expert {e} ({w:.3f})" for e, w in zip(r["experts"], r["weights"]))
                  for name, r in routing.items()]
        parts.append("")
    parts += ["## Backbone\n", f"- base model: `{base}`", f"- revision: `{backbone.get('revision') or 'not recorded'}`", ""]
    return "\n".join(parts)
