"""The closed sets of values that the weight operations accept, in one light module (no torch) so
that the command line builds its choices from them."""

from __future__ import annotations

from typing import Literal, get_args

Method = Literal["paramdelta", "task_arithmetic", "ties", "dare_linear", "dare_ties"]
METHODS: tuple[str, ...] = get_args(Method)
Rescale = Literal["l1", "inverse", "none"]
RESCALES: tuple[str, ...] = get_args(Rescale)
NewRows = Literal["post", "mean", "error"]
NEW_ROWS: tuple[str, ...] = get_args(NewRows)
RouterInit = Literal["random", "zero"]
ROUTER_INITS: tuple[str, ...] = get_args(RouterInit)
OutputDtype = Literal["auto", "float32", "bfloat16", "float16"]
OUTPUT_DTYPES: tuple[str, ...] = get_args(OutputDtype)
