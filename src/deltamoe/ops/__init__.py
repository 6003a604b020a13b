"""The weight operations: upcycle, expand, delta extract, graft and merge.

Each operation reads as validate -> plan -> write: it checks its arguments and inputs (nothing is
read but headers and configs), plans the output's tensors (names, dtypes, shapes) and how each is
made, then writes them through :func:`deltamoe.io.output.write_output` (streamed by the engine,
:func:`deltamoe.engine.run_steps`, for the elementwise ones; see :func:`deltamoe.ops.steps.stream_output`).

- :mod:`~deltamoe.ops.sources`: one Δ = P − B, from a (B, P) pair or a delta artifact.
- :mod:`~deltamoe.ops.deltas`: several deltas Σ wᵢΔᵢ and the ``PATH:WEIGHT`` arguments.
- :mod:`~deltamoe.ops.common`: argument checks, dtypes and configs, names, seeded randomness.
- :mod:`~deltamoe.ops.steps`: the engine steps that extract, graft and merge share (M + Δ,
  copies, the vocabulary rows a post-trained model added) and :func:`~deltamoe.ops.steps.stream_output`.
- one module per operation: :mod:`~deltamoe.ops.upcycle`, :mod:`~deltamoe.ops.expand`,
  :mod:`~deltamoe.ops.extract`, :mod:`~deltamoe.ops.graft` (onto an MoE),
  :mod:`~deltamoe.ops.expand_graft` (onto a block-expanded model), :mod:`~deltamoe.ops.merge`
  with its per-tensor arithmetic in :mod:`~deltamoe.ops.merge_methods`.

Nothing is imported here: ``import deltamoe.ops.graft`` pays only for what graft needs.
"""
