"""CoPL (paper §4), everything only it uses, in one folder:

- :mod:`~coplctl.copl.method`: the registered method (GCF user embeddings gating a mixture of LoRA experts);
- :mod:`~coplctl.copl.mole`: the mixture of LoRA experts and its gates; :mod:`~coplctl.copl.peft_mole` the same
  experts as a peft custom LoRA layer (export);
- :mod:`~coplctl.copl.adapt`: optimisation-free adaptation of new users over the GCF graph (§4.3), with
  :mod:`~coplctl.copl.placement` for responses outside the graph;
- :mod:`~coplctl.copl.experiments`, :mod:`~coplctl.copl.pseudo`: the paper's extra experiments (Tables 4-6,
  Figure 2) a benchmark runs, and :mod:`~coplctl.copl.report`, their tables and figures in reports;
- :mod:`~coplctl.copl.figures`: the t-SNE of user embeddings and the expert allocation (Figures 1, 3, 4).

The graph and its training (GCF, §4.1) are a layer of their own below the reward models: :mod:`coplctl.graph`.
"""

ADAPTATIONS = ("weighted", "average", "optimize")
"""The ways of placing a new user (paper Table 4: CoPL, Naive Avg., User Opt.): the one list that
adaptation options, spec entries and command-line choices read (here, so that the CLI reads it without
importing torch)."""
