"""``deltamoe run``: turn a recipe into the stages of DeltaMoE and its baselines, run them, report.

Systems compared (all on the same inputs and evaluation):

    base            B
    post            P
    dense_cpt       B'  = B continued-pretrained on the new-language corpora (every weight trains)
    paramdelta      B' + (P - B)
    task_arithmetic, ties, dare_linear, dare_ties   data-free merges of B' and P relative to B
    moe_lpr         the MoE after stage 1 (post-pretraining) and stage 2 (router review), no delta
    deltamoe        moe_lpr + expand(P - B)
    moe_unallocated the same upcycling, training and graft with learned routing only: no router
                    mask, no LPR loss (what the language allocation contributes)
    budget_matched  B'' + (P - B), where B'' is dense CPT with the same training FLOPs as the MoE run
    block_expansion B with new identity decoder blocks (LLaMA-Pro), as many new parameters as the
                    MoE's new experts, only they trained on stage 1's data, then P - B grafted onto
                    the original blocks: the parameter-matched dense baseline
    ceiling         B' post-trained on chat data in every language (toy only): the path the method
                    avoids, an upper bound rather than a baseline

Modules, by concern:

    specs       the recipe's sections as the training configs of each stage
    graph       the stages of each system (``build_plan``), one builder per family of systems
    stages      the plan's nodes, their cache keys, and the runner that executes them in order
    accounting  FLOP matching (6 x N_active x tokens), parameter matching, disk estimates
    checks      what is checked before the first stage: training sections, models, data, disk
    run         ``run_recipe``: check, plan, run (or print the plan), collect results, report
"""
