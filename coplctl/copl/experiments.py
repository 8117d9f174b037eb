"""The paper's extra experiments on a trained CoPL model, run by a benchmark through
:meth:`coplctl.models.reward.RewardMethod.experiments`; each spec section turns one on:

- ``gcf`` (always): Table 5, the GCF's train/valid accuracy and group probe;
- ``adaptation``: Table 4, unseen accuracy for each adaptation method;
- ``fewshot_curve``: Figure 2, unseen accuracy against few-shot annotations, per hop count;
- ``figures``: the t-SNE of user embeddings and the expert allocation;
- ``pseudo_labels``: Table 6 (:mod:`coplctl.copl.pseudo`).

Variants of the trained model are :meth:`CoPL.variant` s: a config made with ``dataclasses.replace``,
the seen users only, and the model as it was afterwards.
"""

from __future__ import annotations

from coplctl.models.evaluate import evaluate
from coplctl.core.files import read_json
from coplctl.models.reward import ExperimentContext, RewardMethod


def run_experiments(copl: RewardMethod, ctx: ExperimentContext) -> dict:
    """The experiments the spec asks for, on ``copl``, a trained :class:`coplctl.copl.method.CoPL` (this
    module imports nothing of it: the method calls here, never the other way)."""
    spec, ds = ctx.spec, ctx.data
    extra: dict = {"gcf": read_json(copl.gcf_dir / "metrics.json", what="GCF metrics")}
    extra["gcf"].pop("history", None)
    adapted = copl.net.user_table[copl.seen_users:].detach().clone(), copl.user_ids[copl.seen_users:]
    if spec.adaptation:
        ctx.stage("adaptation variants")
        extra["adaptation"] = {}
        for variant in spec.adaptation:
            with copl.variant(adaptation=variant) as m:
                extra["adaptation"][variant] = evaluate(m, ds, roles=("unseen",))["metrics"].get("unseen")
    if spec.fewshot_curve:
        ctx.stage("few-shot curve")
        curve: dict = {}
        for hops in spec.fewshot_curve.hops:
            for shots in spec.fewshot_curve.shots:
                with copl.variant(adaptation="weighted", hops=hops) as m:
                    metrics = evaluate(m, ds, fewshot=shots, roles=("unseen",))["metrics"].get("unseen")
                curve.setdefault(str(hops), {})[str(shots)] = metrics["accuracy"] if metrics else None
        extra["fewshot_curve"] = curve
    if spec.figures and ctx.main_process:
        ctx.stage("figures")
        from coplctl.copl.figures import plot_embeddings, plot_experts

        fig = ctx.out_dir / "figures"
        extra["figures"] = {"tsne": plot_embeddings(copl.gcf_dir, fig / f"tsne-seed{ctx.seed}.png",
                                                    adapted_embeddings=(adapted[1], adapted[0]))["path"]}
        if copl.config.mole:
            extra["figures"]["experts"] = plot_experts(ctx.run_dir, fig / f"experts-seed{ctx.seed}.png")["path"]
    if spec.pseudo_labels:
        ctx.stage("pseudo labels")
        from coplctl.copl.pseudo import pseudo_label_experiments

        extra["pseudo_labels"] = pseudo_label_experiments(copl, ctx)
    return extra
