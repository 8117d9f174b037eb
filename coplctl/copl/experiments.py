"""The paper's extra experiments on a trained CoPL model, run by a benchmark through
:meth:`coplctl.models.reward.RewardMethod.experiments`; a spec turns them on under ``experiments: {copl:
{...}}`` (:class:`CoPLExperiments`):

- ``gcf`` (always): Table 5, the GCF's train/valid accuracy and group probe;
- ``adaptation_variants``: Table 4, unseen accuracy for each adaptation method;
- ``fewshot_curve``: Figure 2, unseen accuracy against few-shot annotations, per hop count;
- ``run_figures``: the t-SNE of user embeddings and the expert allocation;
- ``pseudo_labels``: Table 6 (:mod:`coplctl.copl.pseudo`).

Variants of the trained model are :meth:`CoPL.variant` s: a config made with ``dataclasses.replace``,
the seen users only, and the model as it was afterwards. Their tables and figures in reports:
:mod:`coplctl.copl.report`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from coplctl.copl import ADAPTATIONS
from coplctl.core.errors import CoplError
from coplctl.core.files import read_json
from coplctl.models.evaluate import evaluate
from coplctl.models.reward import ExperimentContext, RewardMethod


@dataclass
class FewshotCurve:
    """Figure 2: CoPL's unseen accuracy against the number of few-shot annotations, per hop count."""

    shots: list[int] = field(default_factory=lambda: [1, 2, 4, 8, 16])
    """Few-shot annotations given to each unseen user (the first ones of its fewshot pairs)."""
    hops: list[int] = field(default_factory=lambda: [2, 4])
    """k of the k-hop adaptation (paper: 2 and 4)."""


@dataclass
class PseudoLabels:
    """Table 6: reward models trained on GCF pseudo-labels."""

    pairs_per_user: int = 16
    """Extra survey pairs per seen user, labelled by the GCF, added to CoPL's training pairs."""
    users_per_group: int = 10
    """Users per group that get their own Uniform model trained on pseudo-labels (paper: 10)."""
    pairs_per_specific_user: int = 2000
    """Pseudo-labelled survey pairs each of those user-specific models is trained on."""


@dataclass
class CoPLExperiments:
    """CoPL's section of a benchmark spec, ``experiments: {copl: {...}}``; every experiment is off by default
    except the figures (the GCF's metrics for Table 5 are always stored)."""

    adaptation_variants: list[str] = field(default_factory=list)
    """Table 4: the unseen-user adaptation methods to evaluate (weighted, average, optimize)."""
    fewshot_curve: FewshotCurve | None = None
    """Figure 2 (None: skip)."""
    pseudo_labels: PseudoLabels | None = None
    """Table 6 (None: skip)."""
    run_figures: bool = True
    """Draw the t-SNE of user embeddings and the expert allocation of each CoPL run."""

    def __post_init__(self):
        bad = [a for a in self.adaptation_variants if a not in ADAPTATIONS]
        if bad:
            raise CoplError(f"adaptation_variants entries are {', '.join(ADAPTATIONS)}, not {bad[0]!r}")


def run_experiments(copl: RewardMethod, ctx: ExperimentContext) -> dict:
    """The experiments ``ctx.options`` (a :class:`CoPLExperiments`) asks for, on ``copl``, a trained
    :class:`coplctl.copl.method.CoPL` (this module imports nothing of it: the method calls here, never the
    other way)."""
    options, ds = ctx.options, ctx.data
    extra: dict = {"gcf": read_json(copl.gcf_dir / "metrics.json", what="GCF metrics")}
    extra["gcf"].pop("history", None)
    adapted = copl.net.user_table[copl.seen_users:].detach().clone(), copl.user_ids[copl.seen_users:]
    if options.adaptation_variants:
        ctx.stage("adaptation variants")
        extra["adaptation"] = {}
        for variant in options.adaptation_variants:
            with copl.variant(adaptation=variant) as m:
                extra["adaptation"][variant] = evaluate(m, ds, roles=("unseen",))["metrics"].get("unseen")
    if options.fewshot_curve:
        ctx.stage("few-shot curve")
        curve: dict = {}
        for hops in options.fewshot_curve.hops:
            for shots in options.fewshot_curve.shots:
                with copl.variant(adaptation="weighted", hops=hops) as m:
                    metrics = evaluate(m, ds, fewshot=shots, roles=("unseen",))["metrics"].get("unseen")
                curve.setdefault(str(hops), {})[str(shots)] = metrics["accuracy"] if metrics else None
        extra["fewshot_curve"] = curve
    if options.run_figures and ctx.main_process:
        ctx.stage("figures")
        from coplctl.copl.figures import plot_embeddings, plot_experts

        fig = ctx.out_dir / "figures"
        extra["figures"] = {"tsne": plot_embeddings(copl.gcf_dir, fig / f"tsne-seed{ctx.seed}.png",
                                                    adapted_embeddings=(adapted[1], adapted[0]))["path"]}
        if copl.config.mole:
            extra["figures"]["experts"] = plot_experts(ctx.run_dir, fig / f"experts-seed{ctx.seed}.png")["path"]
    if options.pseudo_labels:
        ctx.stage("pseudo labels")
        from coplctl.copl.pseudo import pseudo_label_experiments

        extra["pseudo_labels"] = pseudo_label_experiments(copl, ctx)
    return extra
